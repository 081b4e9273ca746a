"""Work items for the runner, worker and scheduler tests, built as the bot builds them."""

from __future__ import annotations

from jobs.payloads import GenerateInputs, GenerateParams, TrainInputs, TrainParams, WorkItem
from jobs.requests import GenerateRequest, TrainConfig

# The JOB_SECRET the tests' bots and Celery workers share (jobs.signing).
JOB_SECRET = "tests-job-secret-" + "0123456789abcdef" * 2


def train_item(job_id: int, *, handle: str = "sks", class_word: str = "woman", config: TrainConfig | None = None,
               photos: list[bytes] | None = None, checkpoint: bytes | None = None, samples: int = 2) -> WorkItem:
    return WorkItem(job_id, TrainParams(handle, class_word, config or TrainConfig(), samples=samples),
                    TrainInputs(photos or [], checkpoint))


def generate_item(job_id: int, *, key: str | None = None, prompt: str = "on the moon", handle: str | None = None,
                  lora: bytes | None = None) -> WorkItem:
    """A picture request; with `key`, of the person whose LoRA is kept under it (its file `lora`)."""
    return WorkItem(job_id, GenerateParams(GenerateRequest(prompt), adapter_key=key, handle=handle),
                    GenerateInputs(lora=lora))
