"""The image checker: a stand-in built by the command line, loaded from its folder as a real one is,
run by the worker on every picture it makes, without changing any of them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from jobs import events
from jobs.payloads import GenerateInputs, GenerateParams, TrainInputs, TrainParams, WorkItem
from jobs.requests import GenerateRequest
from jobs.worker_config import WorkerConfig, safety_checker_to_load
from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import CLASS, HANDLE, small
from trainer.cli import run
from trainer.engine import encode_pngs
from trainer.safety_checker import STANDARD_CHECKER, checker_source, load_checker
from trainer.worker import Worker


@pytest.fixture(scope="module")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins that flag every picture and none, made as an operator makes them."""
    root = tmp_path_factory.mktemp("checkers")
    made = {}
    for verdict in ("all", "none"):
        out = root / f"flag-{verdict}"
        assert run(["make-safety-checker", str(out), f"--flag-{verdict}"]) == [
            f"safety checker: {out} (flags {'every picture' if verdict == 'all' else 'none'})"]
        made[verdict] = out
    return made


def some_pngs() -> list[bytes]:
    from PIL import Image

    return encode_pngs([Image.new("RGB", (64, 48), colour) for colour in ("white", "black", "#c08040")])


def test_a_stand_in_loads_from_its_folder_and_flags_all_or_none(checkers):
    flag_all, flag_none = (load_checker(str(checkers[v]), "tiny", "cpu") for v in ("all", "none"))
    assert flag_all is not None and flag_none is not None
    assert flag_all.flags(some_pngs()) == [True, True, True]
    assert flag_none.flags(some_pngs()) == [False, False, False]
    assert flag_all.flags([]) == []


def test_which_checker_a_worker_loads():
    assert safety_checker_to_load("images", "") == ""
    assert safety_checker_to_load("images", " org/checker ") == "org/checker"
    assert safety_checker_to_load("prompts", "org/checker") is None
    assert safety_checker_to_load("off", "") is None
    assert checker_source("", "runwayml/stable-diffusion-v1-5") == STANDARD_CHECKER
    assert checker_source("", "tiny") is None  # no hub download for a test model
    assert checker_source("/models/checker", "tiny") == "/models/checker"


def test_a_checker_that_cannot_be_had_is_one_warning_and_no_checker(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.safety_checker"):
        assert load_checker(None, "tiny", "cpu") is None
        assert caplog.records == []  # SAFETY off or prompts: nothing to say
        assert load_checker("", "tiny", "cpu") is None
        assert load_checker(str(tmp_path / "missing"), "tiny", "cpu") is None
    first, second = (r.getMessage() for r in caplog.records)
    assert "tiny has no image checker" in first and "falls back to prompts" in first
    assert "could not be loaded" in second and "falls back to prompts" in second


def worker(tmp_path: Path, checker: Path | None, name: str) -> Worker:
    return Worker(WorkerConfig("tiny", "cpu", str(tmp_path / name), str(tmp_path / "class"),
                               safety_checker=str(checker) if checker else None))


def test_generated_pictures_carry_the_verdict_and_stay_as_drawn(tmp_path, checkers):
    item = WorkItem(1, GenerateParams(GenerateRequest("on the moon", num_images=2, seed=7)), GenerateInputs())
    unchecked = worker(tmp_path, None, "plain").run(item, events.ignore, lambda: False)
    flagged = worker(tmp_path, checkers["all"], "all").run(item, events.ignore, lambda: False)
    passed = worker(tmp_path, checkers["none"], "none").run(item, events.ignore, lambda: False)
    assert [p.flagged for p in unchecked.images] == [None] * len(unchecked.images)
    assert [p.flagged for p in flagged.images] == [True] * len(flagged.images)
    assert [p.flagged for p in passed.images] == [False] * len(passed.images)
    # The same seeds draw the same pictures: the checker blacked none of them out.
    assert [p.png for p in flagged.images] == [p.png for p in unchecked.images]


def test_a_trainings_previews_and_samples_carry_the_verdict(tmp_path, checkers):
    log: list[events.Event] = []
    config = small(steps=2, prior_preservation=False, resolution=64, preview_every=1)
    item = WorkItem(1, TrainParams(HANDLE, CLASS, config, samples=2, sample_steps=2), TrainInputs(training_photos()))
    result = worker(tmp_path, checkers["all"], "w").run(item, log.append, lambda: False)
    previews = [e for e in log if isinstance(e, events.Preview)]
    assert previews and all(p.flagged for p in previews)
    assert len(result.samples) == 2 and all(s.flagged for s in result.samples)
