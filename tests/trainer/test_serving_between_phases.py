"""A training serves waiting generations not only between its steps but within its other phases:
after each batch of class images and of cached latents, between a preview's denoising steps, after
the last step and before each sample picture, so an /imagine that arrives at any time waits for one
step or one batch, not the rest of a phase."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs import events
from jobs.payloads import TrainInputs, TrainParams, WorkItem
from jobs.requests import GenerateRequest
from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import CLASS, HANDLE, run_train, small
from trainer.class_images import cache_key
from trainer.dreambooth import class_prompt
from trainer.engine import GenerationEngine
from trainer.pipelines import build_random_pipeline

SERVED = SimpleNamespace(type="served")  # a mark in the log of events


@pytest.fixture(scope="module")
def other_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Someone else's LoRA, which the generations served during the training use."""
    tmp = tmp_path_factory.mktemp("other")
    return run_train(tmp, small(steps=3, learning_rate=1e-2, train_text_encoder=True,
                                prior_preservation=False)).lora_path


def kinds(log: list[events.Event]) -> list[str]:
    """The log as 'stage:<name>', 'progress:<stage>:<step>' and 'served' entries."""
    out = []
    for event in log:
        if event.type == "stage":
            out.append(f"stage:{event.stage}")
        elif event.type == "progress":
            out.append(f"progress:{event.stage}:{event.step}")
        elif event.type in ("served", "preview"):
            out.append(event.type)
    return out


def test_a_training_serves_within_every_phase_and_its_results_do_not_change(
        tmp_path: Path, other_lora: Path) -> None:
    config = small(steps=4, num_class_images=3, class_image_batch=1, train_text_encoder=True, preview_every=2,
                   preview_steps=3)
    alone_log: list[events.Event] = []
    alone = run_train(tmp_path / "alone", config, on_event=alone_log.append)

    pipe = build_random_pipeline("tiny")
    engine = GenerationEngine(pipe)
    request = GenerateRequest("on a horse", seed=3, steps=2)
    log: list[events.Event] = []

    def serve() -> None:
        log.append(SERVED)
        engine.generate(request, adapter_key="other", lora_path=other_lora, handle=HANDLE, class_word=CLASS)

    shared = run_train(tmp_path / "shared", config, pipe=pipe, on_event=log.append, serve_riders=serve)

    seen = kinds(log)
    phases = seen[seen.index("stage:class_images"):seen.index("stage:saving")]
    # Reports within a step may be skipped (they are rate-limited), so only the order is checked.
    class_part = phases[:phases.index("stage:caching")]
    assert class_part == ["stage:class_images", "progress:class_images:1", "served", "progress:class_images:2",
                          "served", "progress:class_images:3", "served"]
    # Latents in batches of 8: the 5 photos and their mirror images make two, the 3 class images one.
    assert phases[phases.index("stage:caching"):phases.index("stage:training")] == ["stage:caching"] + ["served"] * 3
    training = phases[phases.index("stage:training"):]
    # Before each step, between the denoising steps of each preview (at steps 2 and 4), after the last.
    previews = config.steps // config.preview_every
    assert training.count("preview") == previews
    per_preview = len(pipe.scheduler.timesteps)  # the preview was the pipeline's last run (PNDM: steps + 1)
    assert per_preview >= config.preview_steps
    assert training.count("served") == config.steps + previews * per_preview + 1
    assert training[-2:] == ["preview", "served"]  # the last one: before the save

    # Neither the class images nor the training noticed the generations served in between.
    key = cache_key("tiny", class_prompt(CLASS), config.resolution)
    for i in range(config.num_class_images):
        name = f"{i:05d}.png"
        assert ((tmp_path / "shared" / "class-cache" / key / name).read_bytes()
                == (tmp_path / "alone" / "class-cache" / key / name).read_bytes())
    assert shared.losses == alone.losses
    previews = [e.png for e in log if e.type == "preview"]
    assert previews == [e.png for e in alone_log if e.type == "preview"]


def test_a_worker_serves_before_each_sample_picture(tmp_path: Path) -> None:
    from jobs.worker_config import WorkerConfig
    from trainer.worker import Worker

    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c")))
    log: list[events.Event] = []
    engine_generate = worker.engine.generate

    def generate(request, **kwargs):
        log.append(SimpleNamespace(type="sample" if kwargs.get("adapter_key", "").startswith("train-") else "other"))
        return engine_generate(request, **kwargs)

    worker.engine.generate = generate
    config = small(steps=2, prior_preservation=False, resolution=64)
    item = WorkItem(1, TrainParams(HANDLE, CLASS, config, samples=2, sample_steps=2), TrainInputs(training_photos()))
    result = worker.run(item, log.append, lambda: False, serve_riders=lambda: log.append(SERVED))

    assert len(result.samples) == 2
    after_training = [e.type for e in log[next(i for i, e in enumerate(log) if getattr(e, "stage", "") == "saving"):]]
    assert [t for t in after_training if t in ("served", "sample")] == ["served", "sample", "served", "sample"]
