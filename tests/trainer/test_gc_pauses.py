"""The worker freezes its long-lived objects out of the collector's walks and logs long collections."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer import gc_pauses


@pytest.fixture
def clean_gc() -> Iterator[None]:
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.callbacks[:] = callbacks


def test_freezing_hides_the_objects_alive_now_from_collections(clean_gc: None) -> None:
    gc.unfreeze()
    kept = [[i] for i in range(1000)]
    frozen = gc_pauses.freeze_long_lived()
    # The count can only fall after the freeze: frozen objects still die by reference counting, and
    # some may between the two calls (pytest's own, say); nothing new is frozen.
    assert frozen >= gc.get_freeze_count() >= len(kept)
    tracked = {id(o) for o in gc.get_objects()}
    assert not any(id(o) in tracked for o in kept)  # no longer walked by any generation
    made_later = [[0]]
    assert any(o is made_later[0] for o in gc.get_objects())


def test_collections_slower_than_the_threshold_are_logged_once(clean_gc: None,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    timer = gc_pauses.log_long_collections(threshold_s=0.0)
    assert gc_pauses.log_long_collections() is timer and gc.callbacks.count(timer) == 1
    heard: list[float] = []
    timer.on_long = heard.append  # the figure itself, for a benchmark, unrounded
    with caplog.at_level(logging.WARNING, logger="trainer.gc_pauses"):
        gc.collect()
    assert any("garbage collection of generation 2 paused" in r.getMessage() for r in caplog.records)
    assert heard and all(seconds >= 0 for seconds in heard)
    caplog.clear()
    heard.clear()
    timer.threshold_s = 60.0
    with caplog.at_level(logging.WARNING, logger="trainer.gc_pauses"):
        gc.collect()
    assert not caplog.records and not heard


def test_a_warm_worker_has_frozen_its_model(clean_gc: None, tmp_path: Path) -> None:
    from jobs.worker_config import WorkerConfig
    from trainer.worker import Worker

    gc.unfreeze()
    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c")))
    worker.prepare()
    tracked = {id(o) for o in gc.get_objects()}
    assert gc.get_freeze_count() > 0 and id(worker.pipeline.unet) not in tracked


@pytest.mark.slow
def test_the_gc_benchmark_times_collections_before_and_after_freezing(clean_gc: None, tmp_path: Path) -> None:
    from bench import gc_pause

    result = gc_pause.main(["--model", "tiny", "--device", "cpu", "--backend", "eager", "--repeats", "1",
                            "--steps", "1", "--json", str(tmp_path / "gc.json")])
    assert result["frozen"] > 0 and result["objects"] >= result["frozen"] * 0.5
    # What makes a collection shorter: after the freeze it walks only what was made since, a small
    # part of what it walked before. The count shows it; single timed collections are too noisy to compare.
    assert result["objects_after_freezing"] < result["frozen"] * 0.1
    assert min(result["baseline_full_collection_ms"], result["ours_full_collection_ms"],
               result["ours_after_a_picture_ms"]) >= 0
    assert result["ratio"] == result["baseline_full_collection_ms"] / max(result["ours_full_collection_ms"], 1e-3)


def test_the_collector_is_paused_inside_the_block_and_restored_after():
    """A worker's heavy imports run with the collector off (CPython gh-91351 on Python 3.11); a
    collector that was off stays off."""
    import gc

    from trainer.gc_pauses import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
