"""A worker serves as soon as its model is loaded and switches to compiled code as it becomes ready
(trainer.background_compile): the ordering of the parts it switches to, and a real worker on the tiny
model whose compiling (a stand-in backend, tests/trainer/gated_backend.py) lasts until the test ends it."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from jobs import events
from jobs.payloads import GenerateInputs, GenerateOutput, GenerateParams, TrainOutput, WorkItem
from jobs.requests import GenerateRequest, TrainConfig
from jobs.train_defaults import FAMILY_TUNED
from jobs.worker_config import WorkerConfig
from tests.photos_factory import encode, training_photos
from tests.polling import wait_until_sync as wait_until
from tests.trainer import gated_backend
from tests.work_items import generate_item, train_item
from trainer.background_compile import BackgroundCompile
from trainer.engine import ANY_SHAPE, DURING_TRAINING, square_part
from trainer.start_helpers import TRAINING, Helpers
from trainer.start_report import ARTIFACTS, MODEL, StartReport, helper_compiled
from trainer.worker import Worker

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHelpers(Helpers):
    """Helpers owning some parts, which the test ends one by one."""

    def __init__(self, owned: list[str], failing: tuple[str, ...] = ()) -> None:
        super().__init__({}, [])
        self._ended = {part: threading.Event() for part in owned}
        self._failing = failing
        self.closed = False

    def finish(self, part: str) -> None:
        self._end(part, failed=part in self._failing)

    def close(self) -> None:
        self.closed = True


def seeded_picture(job_id: int) -> WorkItem:
    return WorkItem(job_id, GenerateParams(GenerateRequest("on the moon", seed=7, steps=2)), GenerateInputs())


def background(parts: list[str], helpers: FakeHelpers, adopted: list[str],
               report: StartReport | None = None, frozen_after: list[int] | None = None) -> BackgroundCompile:
    """Compiling that adopts `parts` into `adopted`; `frozen_after` hears how many were adopted at
    each `on_adopted`."""
    frozen_after = [] if frozen_after is None else frozen_after
    compiling = BackgroundCompile(parts, adopted.append, threading.RLock(), report or StartReport(),
                                  after=lambda part: ANY_SHAPE if part.startswith("square-") else None,
                                  on_adopted=lambda: frozen_after.append(len(adopted)))
    helpers._on_end = compiling.heard_end
    compiling.start(helpers)
    return compiling


def test_parts_are_switched_to_as_helpers_finish_them_squares_after_any_shape() -> None:
    parts = [ANY_SHAPE, DURING_TRAINING, square_part(1), TRAINING]
    helpers = FakeHelpers([TRAINING, square_part(1), ANY_SHAPE])
    adopted: list[str] = []
    report = StartReport()
    frozen_after: list[int] = []
    compiling = background(parts, helpers, adopted, report, frozen_after)
    helpers.finish(TRAINING)
    wait_until(lambda: adopted == [TRAINING])
    helpers.finish(square_part(1))  # its code is used only once the any-shape code is: it waits
    helpers.finish(ANY_SHAPE)
    # DURING_TRAINING has no helper: compiled here, but only once no helper's part is still coming.
    assert compiling.wait(timeout=60)
    assert adopted == [TRAINING, ANY_SHAPE, square_part(1), DURING_TRAINING]
    assert frozen_after == [1, 2, 3, 4]  # after each part, once it is in use
    assert helpers.closed and compiling.finished
    names = [timed.part for timed in report.parts]
    assert [n for n in names if not n.startswith("compiled by")] == adopted
    assert {helper_compiled(p) for p in (TRAINING, square_part(1), ANY_SHAPE)} <= set(names)
    assert all(later.at >= earlier.at for earlier, later in zip(report.parts, report.parts[1:], strict=False))


def test_a_part_its_helper_failed_is_compiled_here_and_a_failing_part_is_not_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    helpers = FakeHelpers([TRAINING], failing=(TRAINING,))
    tried: list[str] = []

    def adopt(part: str) -> None:
        tried.append(part)
        raise RuntimeError("no compiler")

    compiling = BackgroundCompile([TRAINING], adopt, threading.RLock(), StartReport())
    helpers._on_end = compiling.heard_end
    compiling.start(helpers)
    with caplog.at_level(logging.WARNING, logger="trainer.background_compile"):
        helpers.finish(TRAINING)
        assert compiling.wait(timeout=60)
    assert tried == [TRAINING]
    assert "did not compile training" in caplog.text and "it runs uncompiled" in caplog.text
    assert not compiling.compiled(TRAINING) or compiling.adopted(TRAINING)


def test_nothing_is_switched_to_while_a_job_holds_the_lock_and_stop_ends_the_helpers() -> None:
    lock = threading.RLock()
    adopted: list[str] = []
    compiling = BackgroundCompile([ANY_SHAPE, DURING_TRAINING], adopted.append, lock, StartReport())
    helpers = FakeHelpers([ANY_SHAPE, DURING_TRAINING])
    helpers._on_end = compiling.heard_end
    with lock:  # a job runs
        compiling.start(helpers)
        helpers.finish(ANY_SHAPE)
        assert not compiling.wait(timeout=0.2)
        assert adopted == [] and compiling.compiled(ANY_SHAPE) and not compiling.adopted(ANY_SHAPE)
    wait_until(lambda: adopted == [ANY_SHAPE])
    compiling.stop()
    assert compiling.wait(timeout=60) and helpers.closed
    assert adopted == [ANY_SHAPE]


@pytest.mark.slow
def test_a_worker_serves_before_its_compile_ends_and_switches_midway_to_the_same_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cache, gate = tmp_path / "cache", tmp_path / "compiling-may-end"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setenv(gated_backend.GATE_ENV, str(gate))  # the helper's environment too
    config = TrainConfig(steps=6, rank=4, num_class_images=2, class_image_steps=2, checkpoint_every=0,
                         preview_every=0, family_defaults=FAMILY_TUNED)
    photos = [encode(p, "PNG") for p in training_photos()]

    eager = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "eager"), str(tmp_path / "classes"), train_rank=4))
    eager.prepare()
    eager_log: list[Any] = []
    assert eager.execute(train_item(1, config=config, photos=photos, samples=0), eager_log.append, lambda: False)
    eager_picture: list[Any] = []
    eager.execute(seeded_picture(2), eager_picture.append, lambda: False)

    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "work"), str(tmp_path / "classes"), train_rank=4,
                                 compile_backend="tests.trainer.gated_backend:backend", start_helpers=1,
                                 compile_cache_dir=str(cache)))
    report = worker.prepare()
    # It serves from here: the model is loaded (and no compiled code was kept yet), nothing of the
    # compiling has ended.
    assert report.names() == [MODEL, ARTIFACTS]
    assert worker.compile_parts() == [ANY_SHAPE, DURING_TRAINING, square_part(1), square_part(4), TRAINING]
    assert not worker.wait_compiled(timeout=0.5)

    before: list[Any] = []
    assert worker.execute(generate_item(3), before.append, lambda: False)
    assert isinstance(before[-1], events.Done) and isinstance(before[-1].result, GenerateOutput)

    log: list[Any] = []
    reads_before_step: list[int] = []  # graphs this process read back from the cache, before each step
    compiled_here: list[int] = []  # graphs this process compiled itself, before each step
    served: list[Any] = []

    def riders() -> None:
        """Between steps (and once after the last): before step 3, a picture, then the compile may end,
        and the training waits for the helper's training step to be in the cache before it goes on."""
        if not any(isinstance(e, events.Stage) and e.stage == "training" for e in log):
            return
        reads_before_step.append(len(gated_backend.READ))
        compiled_here.append(len(gated_backend.COMPILED))
        if len(reads_before_step) == 3:
            worker.execute(generate_item(4), served.append, lambda: False)
            gate.touch()
            wait_until(lambda: worker._background is not None and worker._background.compiled(TRAINING), timeout=600)

    with caplog.at_level(logging.INFO, logger="trainer.training_step"):
        assert worker.execute(train_item(5, config=config, photos=photos, samples=0), log.append, lambda: False,
                              serve_riders=riders)
    assert isinstance(log[-1], events.Done) and isinstance(log[-1].result, TrainOutput)
    assert isinstance(served[-1], events.Done)  # a picture during the training, before its compile ended
    assert "switching to it" in caplog.text
    # Steps 1-2 ran uncompiled; from step 3 on, the step's code was read back from the helper's cache.
    assert len(reads_before_step) == config.steps + 1
    assert reads_before_step[2] == 0 and reads_before_step[-1] > 0 and compiled_here[-1] == 0
    # The same training as the eager worker's, step for step: the same loss and the same model, up to
    # float32 rounding, since the compiled step's fused projections (trainer.fused_linears) sum in
    # another order.
    assert log[-1].result.final_loss == pytest.approx(eager_log[-1].result.final_loss, rel=1e-6)
    switched, plain = safetensors.torch.load(log[-1].result.lora), safetensors.torch.load(eager_log[-1].result.lora)
    assert switched.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(switched[name], tensor, rtol=1e-5, atol=1e-6)

    # Then, with no job running, the worker switches to each part as the helper (which has them all)
    # finishes it, the code for any shape before the squares', reading it back from the cache.
    assert worker.wait_compiled(timeout=600)
    assert len(gated_backend.READ) > reads_before_step[-1]
    switched = [t.part for t in report.parts if not t.part.startswith("compiled by")]
    parts = [ANY_SHAPE, DURING_TRAINING, square_part(1), square_part(4), TRAINING]
    assert switched[:2] == [MODEL, ARTIFACTS] and sorted(switched[2:]) == sorted(parts)
    assert switched.index(ANY_SHAPE) < min(switched.index(square_part(1)), switched.index(square_part(4)))
    after: list[Any] = []
    worker.execute(seeded_picture(6), after.append, lambda: False)
    assert worker.engine._compiled_ready(training=False)
    # The compiled picture is the eager one, up to a level where the fused projections round otherwise.
    compiled, plain = (np.asarray(Image.open(io.BytesIO(out[-1].result.images[0].png)), dtype=np.int16)
                       for out in (after, eager_picture))
    assert np.abs(compiled - plain).max() <= 1
    worker.stop_compiling()


def test_a_squares_warm_up_compiles_their_code_though_pictures_do_not_use_it_yet() -> None:
    """A start helper that owns the squares compiles their static-shape code while no code for any
    shape is in use (in its process, nothing is); the worker's pictures use compiled code only
    once the part that prepares them has run there."""
    from trainer.engine import GenerationEngine
    from trainer.pipelines import build_random_pipeline

    traced: list[str] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        traced.append(gm.code)
        return gm.forward

    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=counting,
                              compiled_after_warm_up=True)
    engine.generate(GenerateRequest("on the moon", seed=1, steps=2))
    assert traced == []  # nothing compiled, nothing used
    engine.warm_up(counts=(1,), parts=[square_part(1)])
    assert traced  # the square's code was compiled ...
    compiled_squares = len(traced)
    assert not engine._compiled_ready(training=False)
    engine.generate(GenerateRequest("on the moon", seed=1, steps=2))
    assert len(traced) == compiled_squares  # ... and is not used before the code for any shape is
    engine.warm_up(counts=(1,), parts=[ANY_SHAPE])
    assert engine._compiled_ready(training=False) and not engine._compiled_ready(training=True)
