"""The command line's rule for compiling (trainer.compile_choice): overrides, devices, job length, warm caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import compile_choice
from trainer.compile_choice import GENERATION, TRAINING_WITH_PRIOR, decide, is_warm, mark_warm, run_key

VERSIONS = {"torch": "2.11.0", "diffusers": "0.42.1"}
SETTINGS = {"model": "sd15", "rank": 16, "resolution": 512, "batch": 1, "prior": True}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("warm", [True, False])
def test_an_explicit_choice_wins_both_ways(device: str, warm: bool) -> None:
    assert decide(device, True, warm, 1, TRAINING_WITH_PRIOR) == (True, "compiling: --compile asked for it")
    assert decide(device, False, warm, 10**9, TRAINING_WITH_PRIOR) == \
        (False, "not compiling: --no-compile asked for it")


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_off_a_gpu_nothing_compiles_unless_asked(device: str) -> None:
    compile, reason = decide(device, None, True, 10**9, TRAINING_WITH_PRIOR)
    assert not compile
    assert device in reason and "--compile to compile anyway" in reason


def test_work_without_cuda_graphs_does_not_compile_by_itself() -> None:
    compile, reason = decide("cuda", None, True, 10**9, TRAINING_WITH_PRIOR, graphed=False)
    assert not compile and "CUDA graphs" in reason


def test_a_short_job_on_a_cold_cache_does_not_compile_and_says_what_it_weighed() -> None:
    compile, reason = decide("cuda", None, False, 800, TRAINING_WITH_PRIOR)
    assert not compile
    saved = round(800 * TRAINING_WITH_PRIOR.saved_per_unit_s)
    assert reason == (f"not compiling: the compiled cache is cold and 800 training steps would save ~{saved} s "
                      f"against ~{TRAINING_WITH_PRIOR.cold_s:.0f} s of compiling; --compile to compile anyway")


def test_a_job_long_enough_to_pay_back_a_cold_compile_compiles() -> None:
    steps = int(TRAINING_WITH_PRIOR.cold_s / TRAINING_WITH_PRIOR.saved_per_unit_s) + 1
    compile, reason = decide("cuda", None, False, steps, TRAINING_WITH_PRIOR)
    assert compile and reason.startswith("compiling: the compiled cache is cold") and "--no-compile" in reason
    assert not decide("cuda", None, False, steps - 2, TRAINING_WITH_PRIOR)[0]


def test_a_warm_cache_lowers_the_bar_to_reading_compiled_code_back() -> None:
    steps = int(TRAINING_WITH_PRIOR.warm_s / TRAINING_WITH_PRIOR.saved_per_unit_s) + 1
    compile, reason = decide("cuda", None, True, steps, TRAINING_WITH_PRIOR)
    assert compile and "warm" in reason and "reading compiled code back" in reason
    assert not decide("cuda", None, False, steps, TRAINING_WITH_PRIOR)[0]


def test_the_costs_follow_the_measured_order() -> None:
    # From bench/RESULTS.md: reading compiled code back is cheaper than compiling, and the bot's
    # longest training (5000 steps) pays back a warm cache but not a cold one.
    for costs in (compile_choice.TRAINING_WITH_PRIOR, compile_choice.TRAINING_WITHOUT_PRIOR, GENERATION):
        assert 0 < costs.warm_s < costs.cold_s and costs.saved_per_unit_s > 0
    assert decide("cuda", None, True, 5000, TRAINING_WITH_PRIOR)[0]
    assert not decide("cuda", None, False, 5000, TRAINING_WITH_PRIOR)[0]


def test_a_finished_compiled_run_leaves_a_marker_that_makes_the_same_run_warm(tmp_path: Path) -> None:
    key = run_key("train", "NVIDIA H100", SETTINGS, VERSIONS)
    assert not is_warm(tmp_path, key)
    mark_warm(tmp_path, key)
    assert is_warm(tmp_path, key)
    assert is_warm(tmp_path, run_key("train", "NVIDIA H100", dict(SETTINGS), dict(VERSIONS)))


@pytest.mark.parametrize("change", [
    {"gpu": "NVIDIA H200"}, {"torch": "2.12.0"}, {"diffusers": "0.43.0"}, {"kind": "imagine"},
    {"rank": 32}, {"resolution": 768}, {"batch": 2}, {"prior": False}, {"model": "sdxl"},
])
def test_a_marker_of_another_gpu_version_or_setting_counts_as_cold(tmp_path: Path, change: dict) -> None:
    mark_warm(tmp_path, run_key("train", "NVIDIA H100", SETTINGS, VERSIONS))
    kind, gpu = change.get("kind", "train"), change.get("gpu", "NVIDIA H100")
    versions = {k: change.get(k, v) for k, v in VERSIONS.items()}
    settings = {k: change.get(k, v) for k, v in SETTINGS.items()}
    assert not is_warm(tmp_path, run_key(kind, gpu, settings, versions))


def test_only_a_compiled_run_leaves_a_marker_where_inductor_keeps_its_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's own inductor cache wins over --compile-cache, and the marker goes with it.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ran = [compile_choice.choose("imagine", "cpu", override, tmp_path / "unused", {"pictures": 1}, 25, GENERATION,
                                 False) for override in (False, True)]
    ran[0].finished()
    assert not is_warm(tmp_path, ran[0].key)
    ran[1].finished()
    assert is_warm(tmp_path, ran[1].key) and ran[1].key["gpu"] == "cpu"
    assert not (tmp_path / "unused").exists()


def test_the_key_holds_the_installed_versions() -> None:
    from importlib import metadata

    key = run_key("imagine", "cpu", {"pictures": 4})
    assert key["torch"] == metadata.version("torch") and key["diffusers"] == metadata.version("diffusers")
    assert key["pictures"] == "4"
