"""The GPU benchmarks run end to end on the tiny model on the CPU, so they cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import job_speed, train_speed

pytestmark = pytest.mark.slow


def test_the_training_benchmark_reports_both_sides_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for label in ("prior", "no prior"):
        ours, recipe = results[f"ours ({label})"], results[f"diffusers recipe ({label})"]
        assert ours["ms_per_step"] > 0 and recipe["ms_per_step"] > 0
        assert math.isclose(results[f"speedup ({label})"]["ratio"], recipe["ms_per_step"] / ours["ms_per_step"])
        # Same seeds, same draws: in fp32 the two loss curves coincide step by step.
        curves = results[f"loss curves ({label})"]
        assert curves["steps"] == 3 and curves["ours_mean"] > 0
        assert curves["mean_abs_diff"] < 1e-4 * curves["ours_mean"]


def test_the_training_benchmark_compares_sdxl_with_its_own_recipe(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny-sdxl", "--device", "cpu", "--steps", "1", "--warmup", "1", "--prior", "yes",
                      "--gradient-checkpointing", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert results["ours, gradient checkpointing (prior)"]["ms_per_step"] > 0
    curves = results["loss curves (prior)"]  # train_dreambooth_lora_sdxl.py's step, same draws
    assert curves["steps"] == 2 and curves["mean_abs_diff"] < 1e-4 * curves["ours_mean"]
    # Each side alone, as a ten-minute GPU run may need.
    train_speed.main(["--model", "tiny-sdxl", "--device", "cpu", "--steps", "1", "--warmup", "0", "--prior", "no",
                      "--no-recipe", "--json", str(out)])
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["ours (no prior)"]


def test_the_training_benchmark_compares_flux_with_its_own_recipe(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny-flux", "--device", "cpu", "--steps", "1", "--warmup", "1", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for label in ("prior", "no prior"):  # train_dreambooth_lora_flux.py's step, same draws
        curves = results[f"loss curves ({label})"]
        assert curves["steps"] == 2 and curves["mean_abs_diff"] < 1e-4 * curves["ours_mean"]
        assert results[f"ours ({label})"]["ms_per_step"] > 0


def test_the_training_benchmark_compares_checkpointed_flux_steps_like_for_like(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny-flux", "--device", "cpu", "--steps", "1", "--warmup", "1", "--prior", "no",
                      "--no-compile", "--gradient-checkpointing", "--recipe-checkpointing", "--json", str(out)])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"ours (no prior)", "ours, gradient checkpointing (no prior)",
                            "diffusers recipe (no prior)", "speedup (no prior)", "loss curves (no prior)"}
    ratio = results["diffusers recipe (no prior)"]["ms_per_step"] / results[
        "ours, gradient checkpointing (no prior)"]["ms_per_step"]
    assert results["speedup (no prior)"]["ratio"] == ratio  # against the checkpointed step, not the plain one
    curves = results["loss curves (no prior)"]  # checkpointing recomputes the same forward
    assert curves["steps"] == 2 and curves["mean_abs_diff"] < 1e-4 * curves["ours_mean"]


def test_both_benchmarks_run_flux_with_int8_weights_as_a_24_gb_card_would(tmp_path: Path) -> None:
    """`--quantize int8`: the Flux transformer's weights in int8, trained with checkpointing at a set
    size against the recipe on the same weights, and drawn with LoRAs added beside them."""
    from bench import generate_speed

    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny-flux", "--device", "cpu", "--steps", "1", "--warmup", "1", "--prior", "no",
                      "--no-compile", "--gradient-checkpointing", "--recipe-checkpointing", "--quantize", "int8",
                      "--resolution", "64", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["quantize"], report["resolution"]) == ("int8", 64)
    results = {r["variant"]: r for r in report["results"]}
    assert results["ours, gradient checkpointing (no prior)"]["ms_per_step"] > 0
    curves = results["loss curves (no prior)"]  # the recipe's step on the same int8 weights, same draws
    assert curves["steps"] == 2 and curves["mean_abs_diff"] < 1e-4 * curves["ours_mean"]
    drawn = generate_speed.main(["--model", "tiny-flux", "--device", "cpu", "--steps", "2", "--repeats", "1",
                                 "--switches", "1", "--quantize", "int8", "--resolution", "32"])
    assert (drawn["quantize"], drawn["width"], drawn["height"]) == ("int8", 32, 32)
    assert drawn["ours"]["image_s"] > 0 and drawn["baseline"]["image_s"] > 0
    # PEFT's unmerged layers and the engine's hooks compute the same pictures on the same weights.
    assert drawn["ours"]["pixel_diff_vs_baseline"][0] < 1.0


def test_a_training_variant_that_runs_out_of_memory_is_reported_and_the_benchmark_goes_on() -> None:
    def body() -> list[float]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert train_speed.measure("ours (no prior)", torch.device("cpu"), body) == {
        "variant": "ours (no prior)", "error": "out of memory", "peak_mib": None}


def test_the_training_benchmark_trains_in_fp16_as_a_gpu_without_bf16_would(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    train_speed.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--prior", "no",
                      "--dtype", "fp16", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["dtype"] == "torch.float16"
    results = {r["variant"]: r for r in report["results"]}
    assert results["ours (no prior)"]["ms_per_step"] > 0 and results["diffusers recipe (no prior)"]["ms_per_step"] > 0
    curves = results["loss curves (no prior)"]
    assert curves["mean_abs_diff"] < 0.01 * curves["ours_mean"]  # the same training, up to fp16 rounding


def test_the_job_benchmark_times_class_images_and_whole_jobs(tmp_path: Path) -> None:
    out = tmp_path / "job.json"
    result = job_speed.main(["--model", "tiny", "--device", "cpu", "--steps", "6", "--class-images", "3",
                             "--recipe-steps", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for job in ("first_job", "job"):
        assert result[job]["steps"] == 6
        stages = {"preparing", "class_images", "caching", "training", "saving"}
        assert set(result[job]["stages_s"]) == set(result[job]["stages_ns"]) == stages
        assert all(ns >= 0 for ns in result[job]["stages_ns"].values())
        # The stages tile the job on one clock in whole nanoseconds: no time is left out or counted twice.
        assert sum(result[job]["stages_ns"].values()) == result[job]["total_ns"]
        assert result[job]["total_s"] == result[job]["total_ns"] / 1e9
    assert result["class_images_first_time_s"] > 0 and result["baseline"]["recipe_step_ms"] > 0
    assert result["training_warm_up_s"] == 0.0  # nothing compiles on a CPU
    assert set(result["ratios"]) == {"class_images", "job_vs_recipe_steps"}


def test_the_job_benchmark_runs_one_sdxl_job_when_asked(tmp_path: Path) -> None:
    result = job_speed.main(["--model", "tiny-sdxl", "--device", "cpu", "--steps", "3", "--class-images", "2",
                             "--recipe-steps", "1", "--jobs", "1"])
    assert result["first_job"]["steps"] == 3 and "job" not in result
    assert result["baseline"]["recipe_step_ms"] > 0 and result["ratios"]["job_vs_recipe_steps"] > 0


def test_the_png_benchmark_times_each_encoder_on_both_kinds_of_picture(tmp_path: Path) -> None:
    from bench import png_speed

    out = tmp_path / "png.json"
    results = png_speed.main(["--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    groups = [key for key in results if key != "cpus"]
    assert groups == ["photograph-like n=1", "photograph-like n=4", "noise-like n=1", "noise-like n=4"]
    for group in groups:
        assert len(results[group]) == 3
        assert all(row["ms"] > 0 and row["bytes"] > 1000 for row in results[group].values())
    # A smooth picture compresses; noise does not.
    assert all(row["bytes"] < 0.8 * 512 * 512 * 3 for row in results["photograph-like n=1"].values())


def test_the_pool_benchmark_traces_each_request_during_a_training_to_its_phase(tmp_path: Path) -> None:
    from bench import gpu_pool

    out = tmp_path / "pool.json"
    report = gpu_pool.main(["--model", "tiny", "--device", "cpu", "--workers", "1", "--steps", "40",
                            "--requests", "2", "--resolution", "64", "--class-images", "2", "--request-gap", "0.05",
                            "--no-compile-training", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    during = report["generation_during_trainings_s"]
    assert during["n"] == len(during["all"]) == len(during["arrived_in"]) >= 2
    assert all(s > 0 for s in during["all"]) and during["p95"] >= during["p50"]
    # Phases read "training 12/40", "saving", "generating (sample images)", ... as the job reported them.
    assert any(p.startswith("training ") and p.endswith("/40") for p in during["arrived_in"])
    assert report["idle_generation_s"]["p50"] > 0 and report["parallel_trainings"] == 1


def test_the_worker_start_benchmark_reports_each_start_and_stops_one_out_of_budget(tmp_path: Path) -> None:
    from bench import worker_start

    out = tmp_path / "starts.json"
    starts = ["default:cold", "serial:warm", "dynamic:warm", "default:artifact"]
    results = worker_start.main(["--model", "tiny", "--device", "cpu", "--starts", ",".join(starts),
                                 "--cache-root", str(tmp_path / "caches"), "--json", str(out)])
    assert [r["start"] for r in results] == starts == [r["start"] for r in json.loads(out.read_text())]
    for result in results:
        assert result["finished"] and result["returncode"] == 0 and result["device"] == "cpu" and result["torch"]
        # On a CPU nothing compiles with inductor: the start loads the model and takes jobs; each part
        # is reported with when it ended, on the start's clock.
        assert [part["part"] for part in result["parts"]] == ["model"]
        assert all(0 <= part["seconds"] <= part["at_s"] <= result["first_job_accepted_s"] for part in result["parts"])
        assert result["first_job_accepted_s"] <= result["seconds"]
    # With and without helpers the same code is compiled, so those two starts share one cache.
    assert {p.name for p in (tmp_path / "caches").iterdir()} == {"static", "dynamic"}

    stopped = worker_start.main(["--model", "tiny", "--device", "cpu", "--starts", "default:cold,default:warm",
                                 "--budget", "0"])
    # The budget is spent before the first start can do anything: it is stopped and reported
    # unfinished, with nothing it did not do, and the second start never runs.
    assert len(stopped) == 1 and not stopped[0]["finished"] and stopped[0]["returncode"] is None
    assert stopped[0]["parts"] == [] and stopped[0]["device"] == "unknown"


def test_the_worker_start_benchmark_records_the_workers_figures_unrounded(tmp_path: Path) -> None:
    """What the start's child process writes: each part as the worker reports it and each long
    garbage collection, as heard (a load under 50 ms once read 0.0 s back from the log's line)."""
    from bench import worker_start
    from trainer.gc_pauses import CollectionTimer
    from trainer.start_report import PartTime

    record = tmp_path / "parts.jsonl"
    recorder = worker_start.Recorder(record)
    recorder.part(PartTime("model", 0.0004))
    timer = CollectionTimer(threshold_s=0.0, on_long=recorder.pause)
    timer("start", {})
    timer("stop", {"generation": 2, "collected": 10})
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert entries[0] == {"part": "model", "seconds": 0.0004, "at_s": 0.0}
    assert [list(entry) for entry in entries[1:]] == [["pause_s"]] and entries[1]["pause_s"] >= 0


def test_the_safety_benchmark_times_the_checker_against_drawing_for_one_and_four_pictures(tmp_path: Path) -> None:
    from bench import safety_cost

    out = tmp_path / "safety.json"
    results = safety_cost.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1",
                                "--json", str(out)])
    assert json.loads(out.read_text()) == results
    for count in (1, 4):
        row = results[f"n={count}"]
        assert row["verdicts"] == count  # one verdict per picture drawn
        assert row["drawing_ms"] > 0 and row["checker_ms"] > 0
        assert row["checker_over_drawing"] == pytest.approx(row["checker_ms"] / row["drawing_ms"], rel=0.01, abs=1e-4)


def test_the_cli_benchmark_runs_the_same_job_each_way_and_compares_with_the_baselines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The flows' command lines and the ratios, with each process's run stood in for (a real run on
    the tiny model takes minutes on two cores; `python -m bench.cli_speed --model tiny --device cpu`)."""
    from bench import cli_speed

    ran: list[list[str]] = []
    seconds = {"train": 10.0, "imagine": 2.0, "script": 20.0, "-c": 4.0}

    def timed(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
        ran.append(command)
        kind = "script" if command[1].endswith("lora.py") else "-c" if command[1] == "-c" else command[3]
        return {"seconds": seconds[kind], "ok": True}

    monkeypatch.setattr(cli_speed, "timed", timed)
    monkeypatch.setattr(cli_speed, "make_inputs", lambda root, args, env: (root / "model", root / "photos"))
    results = cli_speed.main(["--model", "tiny", "--device", "cuda", "--steps", "800", "--class-images", "100",
                              "--diffusers-script", str(tmp_path / "train_dreambooth_lora.py"),
                              "--json", str(tmp_path / "cli.json")])
    assert json.loads((tmp_path / "cli.json").read_text()) == results
    ours_cold, ours_warm, script, imagine_cold, imagine_warm, plain = ran
    # Cold and warm share one compile cache (the warm run finds what the cold one left), not class images.
    cache = ours_cold[ours_cold.index("--compile-cache") + 1]
    assert ours_warm[ours_warm.index("--compile-cache") + 1] == cache
    assert ours_cold[ours_cold.index("--class-cache") + 1] != ours_warm[ours_warm.index("--class-cache") + 1]
    # The script trains the same job: the model, photos, steps, rank and prior preservation.
    for flag, value in (("--max_train_steps", "800"), ("--num_class_images", "100"), ("--rank", "16")):
        assert script[script.index(flag) + 1] == value
    assert "--with_prior_preservation" in script and "--mixed_precision" in script
    assert script[script.index("--pretrained_model_name_or_path") + 1] == ours_cold[ours_cold.index("--model") + 1]
    assert imagine_cold == imagine_warm and imagine_cold[3] == "imagine" and plain[1] == "-c"
    out = capsys.readouterr().out
    assert "train ours cold" in out and "2.00x the baseline's speed" in out  # 20 s / 10 s
    assert "imagine ours warm" in out and "2.00x" in out  # 4 s / 2 s
