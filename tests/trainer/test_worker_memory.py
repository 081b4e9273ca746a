"""A worker whose GPU is too small for the fast training step trains with gradient checkpointing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from jobs import events
from jobs.payloads import TrainInputs, TrainParams, WorkItem
from jobs.worker_config import WorkerConfig
from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import CLASS, HANDLE, small
from trainer import dreambooth
from trainer.errors import OutOfMemory
from trainer.worker import Worker


def _job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fits: bool) -> tuple[Worker, WorkItem, list]:
    """A worker whose trainings run out of memory unless checkpointed (or always, unless `fits`)."""
    real_train = dreambooth.train
    configs: list = []

    def train(photos, handle, class_word, config, **kwargs):
        configs.append(config)
        if not config.gradient_checkpointing or not fits:
            raise OutOfMemory("The GPU ran out of memory while training.")
        return real_train(photos, handle, class_word, config, **kwargs)

    monkeypatch.setattr(dreambooth, "train", train)
    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c")))
    config = small(steps=2, prior_preservation=False)
    item = WorkItem(1, TrainParams(HANDLE, CLASS, config, samples=1, sample_steps=2), TrainInputs(training_photos()))
    return worker, item, configs


def test_a_training_short_of_gpu_memory_goes_on_with_gradient_checkpointing(tmp_path, monkeypatch) -> None:
    worker, item, configs = _job(tmp_path, monkeypatch, fits=True)
    seen: list = []
    result = worker.run(item, seen.append, lambda: False)
    assert result.steps == 2
    assert [c.gradient_checkpointing for c in configs] == [False, True]
    assert configs[1] == replace(configs[0], gradient_checkpointing=True)  # nothing else changes
    assert any(isinstance(e, events.Stage) and "short of memory" in e.detail for e in seen)


def test_a_training_that_never_fits_says_so_once(tmp_path, monkeypatch) -> None:
    worker, item, configs = _job(tmp_path, monkeypatch, fits=False)
    with pytest.raises(OutOfMemory, match="^The GPU ran out of memory while training your model"):
        worker.run(item, lambda _e: None, lambda: False)
    assert [c.gradient_checkpointing for c in configs] == [False, True]
