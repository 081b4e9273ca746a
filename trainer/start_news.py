"""What jobs that reach a worker still starting up are told, instead of a bare "Loading the model"."""

from __future__ import annotations

# On a GPU a worker's start compiles generation and the training step, for minutes (bench/RESULTS.md,
# "worker start"): a job that arrives meanwhile says what the start is doing and for how long.
STARTING_DETAIL = "the GPU worker is still starting up"
START_TAKES = "on a GPU, a new install's first start takes 6 to 20 minutes, later ones 2-3"
# A start's first part, announced by `Worker.prepare` and told to jobs that arrive before it does.
FIRST_PART = "loading the base model"
# Seconds between two retellings of a start's news to the jobs waiting on it, so the minutes shown move.
START_NEWS_EVERY_S = 60.0


def starting_detail(part: str, elapsed_s: float) -> str:
    """A waiting job's progress detail while its worker starts: the part under way and the time so far."""
    minutes = int(elapsed_s // 60)
    so_far = "just begun" if minutes == 0 else f"{minutes} min in"
    return f"{STARTING_DETAIL}: {part}, {so_far}; {START_TAKES}"
