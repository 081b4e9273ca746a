"""The `python -m trainer` command line on the tiny model: make-model, train, imagine, errors."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors.torch import load_file

from jobs.handles import NameRuleError, normalize_class_word, validate_handle
from jobs.requests import TRAIN_DEFAULTS, GenerateRequest
from tests.photos_factory import colour_fields
from trainer.__main__ import main
from trainer.cli import run
from trainer.lora_io import read_metadata

ROOT = Path(__file__).resolve().parents[2]


def write_photos(folder: Path, count: int) -> Path:
    """Distinct 512 px photos (intake refuses small ones and near-duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(colour_fields(count, 512, cells=6, seed=1)):
        photo.save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    assert run(["make-model", "tiny", str(out)]) == [f"model: {out}"]
    return out


@pytest.fixture(scope="module")
def training(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A LoRA trained by `train`, and the lines `train` printed."""
    base = tmp_path_factory.mktemp("train")
    photos = write_photos(base / "photos", 5)
    (photos / "notes.txt").write_text("not a photo")  # ignored: not a photo suffix
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # refused by intake, skipped
    out = base / "lora"
    lines = run(["train", "--photos", str(photos), "--handle", "sks", "--class", "woman", "--out", str(out),
                 "--model", str(tiny_model), "--steps", "3", "--resolution", "64", "--class-images", "2",
                 "--rank", "4", "--device", "cpu", "--class-cache", str(base / "cache"),
                 "--checkpoint-every", "2", "--preview-every", "3"])
    assert lines[0] == f"lora: {out / 'pytorch_lora_weights.safetensors'}"
    assert lines[1] == f"kohya: {out / 'sks.safetensors'}" and lines[2] == "steps: 3"
    return out, lines


@pytest.fixture(scope="module")
def trained(training: tuple[Path, list[str]]) -> Path:
    return training[0]


def test_train_writes_the_lora_checkpoint_and_previews(trained: Path, tiny_model: Path) -> None:
    meta = read_metadata(trained / "pytorch_lora_weights.safetensors")
    assert (meta["handle"], meta["class_word"], meta["base_model"], meta["steps"], meta["rank"]) == (
        "sks", "woman", str(tiny_model), "3", "4")
    assert any(k.startswith("lora_unet_") for k in load_file(trained / "sks.safetensors"))
    assert (trained / "checkpoints" / "checkpoint.safetensors").exists()
    assert [p.name for p in (trained / "previews").iterdir()] == ["step-00003.png"]


def test_imagine_writes_images_with_the_lora(trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer.cli"):
        lines = run(["imagine", "a portrait of sks", "--lora", str(trained), "--n", "2", "--out",
                     str(tmp_path), "--steps", "2", "--seed", "7", "--device", "cpu"])
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2 and lines == [f"image: {f}" for f in files]
    assert Image.open(files[0]).size[0] > 0
    # The prompt as drawn, with the class word the LoRA was trained with added after the handle.
    assert "prompt: a portrait of sks woman" in caplog.messages


def test_imagine_can_leave_faces_as_drawn(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.engine import GenerationEngine

    asked: list[bool] = []
    generate = GenerationEngine.generate

    def spy(self: GenerationEngine, request: GenerateRequest, **kwargs: Any) -> Any:
        asked.append(request.face_pass)
        return generate(self, request, **kwargs)

    monkeypatch.setattr(GenerationEngine, "generate", spy)
    for options in ([], ["--no-face-pass"]):
        run(["imagine", "sks", "--lora", str(trained), "--n", "1", "--out", str(tmp_path), "--steps", "1",
             "--seed", "1", "--device", "cpu", *options])
    assert asked == [True, False]


def keep_inductor_cache_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset TORCHINDUCTOR_CACHE_DIR for the test and put back whatever it was after (a compiling run
    sets it), so --compile-cache decides where the markers go."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # recorded, so the deletion below is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")


def choices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.compile_choice"]


def finished_runs(cache: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (cache / "finished-runs").glob("*.json"))


def test_train_compiles_as_told_and_says_so(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import trainer.dreambooth
    from trainer.dreambooth import TrainResult

    keep_inductor_cache_setting(monkeypatch)
    asked: list[bool | None] = []

    def spy(_photos: object, _handle: str, _class_word: str, config: Any, **kwargs: Any) -> TrainResult:
        asked.append(config.compiled_stages)
        assert config.graphs_on("cuda")  # not compiling leaves the CUDA graphs of plain stages on
        return TrainResult(kwargs["out_dir"] / "pytorch_lora_weights.safetensors", None, config.steps, 0.5)

    monkeypatch.setattr(trainer.dreambooth, "train", spy)
    photos, cache = write_photos(tmp_path / "photos", 5), tmp_path / "compiled"
    with caplog.at_level(logging.INFO, logger="trainer.compile_choice"):
        for option in (["--no-compile"], [], ["--compile"]):
            run(["train", "--photos", str(photos), "--handle", "sks", "--class", "woman", "--out",
                 str(tmp_path / "lora"), "--model", str(tiny_model), "--steps", "3", "--device", "cpu",
                 "--compile-cache", str(cache), *option])
            if option != ["--compile"]:
                assert finished_runs(cache) == []
    assert asked == [False, False, True]
    assert choices(caplog) == ["not compiling: --no-compile asked for it",
                               "not compiling: compiled code pays only with CUDA graphs on a GPU, not on cpu; "
                               "--compile to compile anyway",
                               "compiling: --compile asked for it"]
    # The compiled run finished, so the same training counts as warm next time.
    assert finished_runs(cache) == ["train"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)


@pytest.mark.parametrize(("option", "prior", "left_to_family"), [
    ([], True, True), (["--prior"], True, False), (["--no-prior"], False, False)])
def test_train_leaves_prior_preservation_to_the_base_model_unless_told(
        option: list[str], prior: bool, left_to_family: bool, tiny_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux trains without prior preservation by default (jobs.train_defaults); --prior must still
    give it one, so a choice made on the command line is not left to the family."""
    import trainer.dreambooth
    from jobs.train_defaults import for_family
    from trainer.dreambooth import TrainResult

    keep_inductor_cache_setting(monkeypatch)
    asked: list[Any] = []

    def spy(_photos: object, _handle: str, _class_word: str, config: Any, **kwargs: Any) -> TrainResult:
        asked.append(config)
        return TrainResult(kwargs["out_dir"] / "pytorch_lora_weights.safetensors", None, config.steps, 0.5)

    monkeypatch.setattr(trainer.dreambooth, "train", spy)
    run(["train", "--photos", str(write_photos(tmp_path / "photos", 5)), "--handle", "sks", "--class", "woman",
         "--out", str(tmp_path / "lora"), "--model", str(tiny_model), "--steps", "3", "--device", "cpu",
         "--compile-cache", str(tmp_path / "compiled"), *option])
    [config] = asked
    assert ("prior_preservation" in config.family_defaults) == left_to_family
    assert for_family(config, "flux").prior_preservation == (prior and not left_to_family)
    assert for_family(config, "sd15").prior_preservation == prior


def test_train_on_a_gpu_compiles_by_itself_once_a_compiled_run_warmed_the_cache(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    import trainer.dreambooth
    import trainer.pipelines
    from trainer.dreambooth import TrainResult

    keep_inductor_cache_setting(monkeypatch)
    asked: list[bool | None] = []

    def spy(_photos: object, _handle: str, _class_word: str, config: Any, **kwargs: Any) -> TrainResult:
        asked.append(config.compiled_stages)
        return TrainResult(kwargs["out_dir"] / "pytorch_lora_weights.safetensors", None, config.steps, 0.5)

    # The decision as on a GPU; the training itself is the spy's.
    monkeypatch.setattr(trainer.dreambooth, "train", spy)
    monkeypatch.setattr(trainer.pipelines, "pick_device", lambda _requested: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device: "Some GPU")
    photos, cache = write_photos(tmp_path / "photos", 5), tmp_path / "compiled"
    with caplog.at_level(logging.INFO, logger="trainer.compile_choice"):
        for options in (["--steps", "5000"], ["--steps", "50", "--compile"], ["--steps", "5000"],
                        ["--steps", "800"], ["--steps", "5000", "--rank", "32"]):
            run(["train", "--photos", str(photos), "--handle", "sks", "--class", "woman", "--out",
                 str(tmp_path / "lora"), "--model", str(tiny_model), "--compile-cache", str(cache), *options])
    # Cold: 5000 steps do not pay back compiling; after a compiled run of the same kind they pay back
    # reading it back, 800 do not, and another rank is another, cold, kind.
    assert asked == [False, True, True, False, False]
    said = choices(caplog)
    assert said[0].startswith("not compiling: the compiled cache is cold and 5000 training steps")
    assert said[2].startswith("compiling: the compiled cache is warm and 5000 training steps")
    assert said[3].startswith("not compiling: the compiled cache is warm and 800 training steps")
    assert said[4].startswith("not compiling: the compiled cache is cold")


def test_imagine_compiles_as_told_and_says_so(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from trainer.engine import GenerationEngine

    keep_inductor_cache_setting(monkeypatch)
    asked: list[bool | None] = []
    init = GenerationEngine.__init__

    def spy(self: GenerationEngine, pipeline: Any, **kwargs: Any) -> None:
        asked.append(kwargs["compile_blocks"])
        # Compiling the tiny model on the CPU takes minutes; what the command asked for is recorded.
        init(self, pipeline, **{**kwargs, "compile_blocks": False})

    monkeypatch.setattr(GenerationEngine, "__init__", spy)
    cache = tmp_path / "compiled"
    with caplog.at_level(logging.INFO, logger="trainer.compile_choice"):
        for option in ("--no-compile", "--compile"):
            lines = run(["imagine", "sks", "--lora", str(trained), "--n", "1", "--out", str(tmp_path / "out"),
                         "--steps", "1", "--seed", "1", "--device", "cpu", "--compile-cache", str(cache), option])
            assert len(lines) == 1  # the choice goes to the log, not among the result lines
    assert asked == [False, True]
    assert choices(caplog) == ["not compiling: --no-compile asked for it", "compiling: --compile asked for it"]
    assert finished_runs(cache) == ["imagine"]


def test_the_command_train_suggests_runs_as_printed(training: tuple[Path, list[str]]) -> None:
    out, lines = training
    hint = next(line for line in lines if line.startswith("try: "))
    argv = shlex.split(hint.removeprefix("try: "))
    assert argv[:3] == ["python", "-m", "trainer"]
    made = run([*argv[3:], "--n", "1", "--steps", "1", "--device", "cpu"])
    assert len(made) == 1 and Path(made[0].removeprefix("image: ")).parent == out / "images"


def test_imagine_refuses_bad_options_before_loading_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import trainer.pipelines

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(trainer.pipelines, "load_pipeline", no_loading)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for options, message in (
            (["--lora", str(ROOT / "README.md"), "--out", str(tmp_path / "out")], "is not a LoRA file"),
            (["--out", str(a_file / "pictures")], f"Pictures cannot be written to {a_file / 'pictures'}"),
            (["--n", "0", "--out", str(tmp_path / "out")], "1 to 4 pictures"),
            (["--steps", "1000", "--out", str(tmp_path / "out")], "Steps must be between")):
        assert main(["imagine", "a cat", *options]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (options, err)


@pytest.mark.parametrize(("handle", "class_word"),
                         [("the", "man"), ("a b", "man"), ("Jane!", "woman"), ("x", "person"), ("man", "man")])
def test_train_applies_the_bots_handle_rules(handle: str, class_word: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NameRuleError) as refused:
        validate_handle(handle, normalize_class_word(class_word))
    # The folder does not exist: the names are checked first, so that is not what is said.
    assert main(["train", "--photos", str(tmp_path / "nowhere"), "--handle", handle, "--class", class_word,
                 "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {refused.value}\n"


def test_help_shows_defaults_and_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "imagine"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for option, default in (("--steps STEPS training steps, at least 1", TRAIN_DEFAULTS.steps),
                            ("--rank RANK LoRA rank", TRAIN_DEFAULTS.rank), ("--lr LR learning rate", "0.0001"),
                            ("--n N how many images, 1 to 4", 4)):
        assert option in shown and f"(default: {default})" in shown.split(option, 1)[1].split("--", 1)[0]


@pytest.mark.slow
def test_known_third_party_notices_are_not_printed(tiny_model: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trainer", "imagine", "a cat", "--model", str(tiny_model),
                           "--n", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "image: " in done.stdout
    assert "requires torchvision" not in done.stderr and "torch_dtype" not in done.stderr
    assert "torchao" not in done.stderr and "Enum subclass" not in done.stderr  # importing torchao says nothing


def test_missing_folder_and_too_few_photos_are_readable_errors(tmp_path: Path, tiny_model: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--handle", "sks", "--class", "man", "--out", str(tmp_path / "out"), "--model", str(tiny_model),
              "--resolution", "64", "--device", "cpu", "--no-prior"]
    assert main(["train", "--photos", str(tmp_path / "nowhere"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err
    photos = write_photos(tmp_path / "few", 2)
    assert main(["train", "--photos", str(photos), *common]) == 1
    err = capsys.readouterr().err
    assert "at least 5 photos" in err and "Traceback" not in err
    assert main(["train", "--photos", str(photos), *common, "--resolution", "100"]) == 1
    assert "Invalid training settings" in capsys.readouterr().err


def test_unknown_model_is_a_readable_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = write_photos(tmp_path / "photos", 5)
    code = main(["train", "--photos", str(photos), "--handle", "sks", "--class", "man", "--out",
                 str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--device", "cpu"])
    assert code == 1 and "does not exist" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "make-model" in done.stdout and "imagine" in done.stdout


def test_a_celery_worker_compiles_for_generation_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.cli import build_parser

    monkeypatch.delenv("COMPILE_GENERATION", raising=False)
    assert build_parser().parse_args(["worker"]).compile is True
    assert build_parser().parse_args(["worker", "--no-compile"]).compile is False
    monkeypatch.setenv("COMPILE_GENERATION", "off")
    assert build_parser().parse_args(["worker"]).compile is False
    monkeypatch.delenv("COMPILE_STATIC_SHAPES", raising=False)
    assert build_parser().parse_args(["worker"]).static_shapes is True
    assert build_parser().parse_args(["worker", "--no-static-shapes"]).static_shapes is False
    monkeypatch.setenv("COMPILE_STATIC_SHAPES", "0")
    assert build_parser().parse_args(["worker"]).static_shapes is False
    assert build_parser().parse_args(["worker", "--compile-cache", "/x"]).compile_cache == Path("/x")


def test_a_celery_worker_compiles_the_bots_training_unless_told_not_to(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import build_parser

    for name in ("COMPILE_TRAINING", "TRAIN_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["worker"])
    assert (args.compile_training, args.train_rank) == (True, 16)
    assert build_parser().parse_args(["worker", "--no-compile-training"]).compile_training is False
    monkeypatch.setenv("COMPILE_TRAINING", "0")
    monkeypatch.setenv("TRAIN_RANK", "32")
    args = build_parser().parse_args(["worker"])
    assert (args.compile_training, args.train_rank) == (False, 32)
    # A blank value (a .env shared with the bot) means the default; a wrong one fails only `worker`, kindly.
    monkeypatch.setenv("TRAIN_RANK", " ")
    monkeypatch.setenv("START_HELPERS", "auto")
    assert build_parser().parse_args(["worker", "--start-helpers", "1"]).train_rank == 16
    assert build_parser().parse_args(["make-model", "tiny", "out"]).kind == "tiny"
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["worker"])
    assert refused.value.code == 2 and "invalid int value: 'auto'" in capsys.readouterr().err


def test_a_celery_worker_reads_the_env_file_the_bot_shares_under_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.cli import build_parser, worker_environment

    (tmp_path / ".env").write_text("DISCORD_TOKEN=secret\nTRAIN_RANK=7\nCOMPILE_GENERATION=0\n"
                                   "REDIS_URL=redis://gpu-hub:6379/2\nDEVICE=cuda:1\n")
    monkeypatch.chdir(tmp_path)
    for name in ("DISCORD_TOKEN", "TRAIN_RANK", "COMPILE_GENERATION", "REDIS_URL", "DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEVICE", "cuda:0")  # the environment wins, as for the bot
    args = build_parser(worker_environment()).parse_args(["worker"])
    assert (args.train_rank, args.compile, args.redis_url, args.device) == (7, False, "redis://gpu-hub:6379/2",
                                                                            "cuda:0")
    assert "DISCORD_TOKEN" not in os.environ  # the bot's token does not reach the worker's children


def worker_args(tmp_path: Path) -> list[str]:
    return ["worker", "--redis-url", "redis://localhost:1/0", "--model", "tiny", "--device", "cpu",
            "--class-cache", str(tmp_path / "class-cache"), "--compile-cache", str(tmp_path / "compiled")]


def test_a_celery_worker_takes_the_bots_secrets_out_of_its_environment_and_signs_with_job_secret(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its own environment is what every process it starts inherits (start helpers, say)."""
    from trainer import celery_worker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.the-bots-token")
    monkeypatch.setenv("JOB_SECRET", "j" * 40)
    monkeypatch.setenv("MAX_JOB_MESSAGE_MB", "64")
    seen = {}

    def serve(config, redis_url, name, secret, *, max_message_bytes, remove_work_dir):
        seen.update(secret=secret, max_message_bytes=max_message_bytes, environment=set(os.environ))
    monkeypatch.setattr(celery_worker, "serve", serve)
    assert run([*worker_args(tmp_path), "--name", "w1"]) == ["worker w1 stopped"]
    assert seen["secret"] == "j" * 40 and seen["max_message_bytes"] == 64 * 1024 * 1024
    assert not {"DISCORD_TOKEN", "JOB_SECRET"} & seen["environment"]


@pytest.mark.parametrize(("environment", "checker"), [
    ({}, ""), ({"SAFETY_CHECKER": "/models/checker"}, "/models/checker"),
    ({"SAFETY": "prompts", "SAFETY_CHECKER": "/models/checker"}, None), ({"SAFETY": "off"}, None),
])
def test_a_celery_worker_runs_the_image_checker_the_bots_safety_settings_name(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environment: dict[str, str], checker: str | None) -> None:
    from trainer import celery_worker

    monkeypatch.chdir(tmp_path)
    for name in ("SAFETY", "SAFETY_CHECKER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**environment, "JOB_SECRET": "j" * 40}.items():
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(celery_worker, "serve", lambda config, *args, **kwargs: seen.append(config))
    run([*worker_args(tmp_path), "--name", "w1"])
    assert [config.safety_checker for config in seen] == [checker]


def test_a_celery_worker_with_an_unknown_safety_mode_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOB_SECRET", "j" * 40)
    monkeypatch.setenv("SAFETY", "strict")
    assert main(worker_args(tmp_path)) == 1
    assert "SAFETY='strict' is unknown; use one of off, prompts, images." in capsys.readouterr().err


@pytest.mark.parametrize(("secret", "message"), [("", "JOB_SECRET is not set"), ("s" * 31, "JOB_SECRET is too short")])
def test_a_celery_worker_without_a_good_job_secret_exits_non_zero_and_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], secret: str,
        message: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOB_SECRET", secret)
    assert main(worker_args(tmp_path)) == 1
    assert message in capsys.readouterr().err


def test_a_celery_worker_whose_celery_loop_fails_exits_non_zero_and_one_asked_to_stop_exits_0(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Celery reports an unrecoverable error by its exit code (1, as for a stop by Ctrl-C): the worker
    says so and exits 1, unless it was asked to stop (SIGTERM, SIGINT)."""
    from celery import signals

    from trainer import celery_worker
    from trainer.worker import Worker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Worker, "prepare", lambda self, on_part=None: None)
    monkeypatch.setattr(celery_worker, "wait_for_redis", lambda client: None)
    monkeypatch.setattr(celery_worker.CeleryWorker, "start_heartbeat", lambda self: None)
    monkeypatch.setattr(celery_worker.CeleryWorker, "stop", lambda self, remove_work_dir=False: None)
    monkeypatch.setenv("JOB_SECRET", "j" * 40)
    monkeypatch.setattr(celery_worker, "run_celery", lambda app, name, log_level: 1)
    assert main(worker_args(tmp_path)) == 1
    assert "The worker stopped on an error (exit code 1)" in capsys.readouterr().err

    def stopped_by_ctrl_c(app, name, log_level):
        signals.worker_shutting_down.send(sender=name, sig="SIGINT", how="Warm", exitcode=1)
        return 1
    monkeypatch.setenv("JOB_SECRET", "j" * 40)
    monkeypatch.setattr(celery_worker, "run_celery", stopped_by_ctrl_c)
    assert main(worker_args(tmp_path)) == 0
