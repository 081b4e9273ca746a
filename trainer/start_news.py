"""What jobs that reach a worker still starting up are told, instead of a bare "Loading the model"."""

from __future__ import annotations

# A worker's start is the model's load (what compiles on a GPU does so in the background while it
# serves, trainer.background_compile): a job that arrives meanwhile says what it waits for.
STARTING_DETAIL = "the worker is still starting up"
GPU_START_TAKES = "on a GPU that takes under a minute, a little more the first time the model is read from disk"
OTHER_START_TAKES = "it only loads the model here, so it should not be long"
# A start's first part, announced by `Worker.prepare` and told to jobs that arrive before it does.
FIRST_PART = "loading the base model"
# Seconds between two retellings of a start's news to the jobs waiting on it, so the minutes shown move.
START_NEWS_EVERY_S = 60.0


def start_takes(device: str) -> str:
    """How long a start takes on `device` (a worker's setting: auto, cpu, cuda, cuda:N, mps)."""
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return GPU_START_TAKES if on_cuda else OTHER_START_TAKES


def starting_detail(part: str, elapsed_s: float, takes: str) -> str:
    """A waiting job's progress detail while its worker starts: the part under way, the time so far
    and what a start takes on this worker's device (`start_takes`)."""
    minutes = int(elapsed_s // 60)
    so_far = "just begun" if minutes == 0 else f"{minutes} min in"
    return f"{STARTING_DETAIL}: {part}, {so_far}; {takes}"
