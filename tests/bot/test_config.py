"""Settings validation: each wrong value gives one clear line; good values parse."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_settings


def _load(tmp_path: Path, **env: str):
    base = {"DISCORD_TOKEN": "x" * 30, "DATA_DIR": str(tmp_path / "data")}
    base.update(env)
    return load_settings(base, env_file=None)


def test_defaults_and_types(tmp_path):
    s = _load(tmp_path, MAX_PHOTOS="12", TRAIN_LEARNING_RATE="2e-4", DEVICE="cuda:1", DEV_GUILD_ID="42")
    assert s.max_photos == 12 and s.train_learning_rate == pytest.approx(2e-4)
    assert s.device == "cuda:1" and s.dev_guild_id == 42
    assert s.min_photos == 5 and s.base_model.startswith("stable-diffusion-v1-5/")
    assert (tmp_path / "data").is_dir()
    assert "x" * 30 not in repr(s)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DISCORD_TOKEN": ""}, "DISCORD_TOKEN is not set."),
        ({"MAX_PHOTOS": "many"}, "MAX_PHOTOS='many' is not a whole number."),
        ({"TRAIN_LEARNING_RATE": "fast"}, "TRAIN_LEARNING_RATE='fast' is not a number."),
        ({"DEVICE": "tpu"}, "DEVICE='tpu' is not a device; use auto, cpu, cuda, cuda:N or mps."),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD' is unknown"),
        ({"MIN_PHOTOS": "40"}, "MIN_PHOTOS is larger than MAX_PHOTOS"),
        ({"DISCORD_API_BASE": "ftp://x"}, "DISCORD_API_BASE='ftp://x' must start with http:// or https://."),
        ({"COMPILE_GENERATION": "maybe"}, "COMPILE_GENERATION='maybe' is not on or off; use 1 or 0."),
        # Values the trainer or the rules would refuse later, on every job: refused at start instead.
        ({"TRAIN_RESOLUTION": "56"}, "TRAIN_RESOLUTION must be 0 (the base model's own) or a multiple of 8, at least 64"),
        ({"TRAIN_LEARNING_RATE": "-1"}, "TRAIN_LEARNING_RATE must be a positive number"),
        ({"TRAIN_LEARNING_RATE": "nan"}, "TRAIN_LEARNING_RATE must be a positive number"),
        ({"MAX_QUEUED_GENERATIONS": "0"}, "MAX_QUEUED_GENERATIONS must be at least 1."),
        ({"MAX_PROMPT_CHARS": "0"}, "MAX_PROMPT_CHARS must be at least 1."),
        ({"INTAKE_PROCESSES": "0"}, "INTAKE_PROCESSES must be at least 1."),
        ({"INTAKE_PROCESSES": "100"}, "INTAKE_PROCESSES must be at most 32"),
        ({"PROGRESS_INTERVAL_S": "-2"}, "PROGRESS_INTERVAL_S must be 0 or a positive number"),
        ({"JOB_BACKEND": "celery", "REDIS_URL": "localhost:6379", "JOB_SECRET": "j" * 32},
         "REDIS_URL must start with redis://"),
        ({"JOB_BACKEND": "celery"}, "JOB_SECRET is not set; with JOB_BACKEND=celery"),
        ({"JOB_BACKEND": "celery", "JOB_SECRET": "password"}, "JOB_SECRET is too short (8 characters, at least 32)"),
        ({"MAX_JOB_MESSAGE_MB": "0"}, "MAX_JOB_MESSAGE_MB must be at least 1."),
        ({"QUANTIZE": "int4"}, "QUANTIZE='int4' is unknown; use one of none, int8."),
        # Int8 weights are for Flux; a base model known to be Stable Diffusion is refused before any load.
        ({"QUANTIZE": "int8"}, "QUANTIZE=int8 works with Flux base models only, and BASE_MODEL="
                               "stable-diffusion-v1-5/stable-diffusion-v1-5 is Stable Diffusion"),
        ({"QUANTIZE": "int8", "BASE_MODEL": "tiny"}, "QUANTIZE=int8 works with Flux base models only"),
    ],
)
def test_each_problem_has_one_clear_line(tmp_path, env, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **env)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected)


def test_compiling_for_generation_is_on_unless_switched_off_and_workers_cache_it_in_the_data_dir(tmp_path):
    from bot.app import build_runner

    assert _load(tmp_path).compile_generation is True
    assert _load(tmp_path, COMPILE_GENERATION="Yes").compile_generation is True
    for off in ("0", "off", "FALSE", "no"):
        assert _load(tmp_path, COMPILE_GENERATION=off).compile_generation is False
    runner = build_runner(_load(tmp_path, COMPILE_GENERATION="0", DEVICE="cpu", WORKERS="2"))
    configs = [slot.config for slot in runner._slots]
    assert [c.compile_generation for c in configs] == [False, False]
    assert [c.compile_static_shapes for c in configs] == [True, True]
    static_off = build_runner(_load(tmp_path, COMPILE_STATIC_SHAPES="off", DEVICE="cpu", WORKERS="2"))
    assert [(s.config.compile_generation, s.config.compile_static_shapes) for s in static_off._slots] == \
        [(True, False), (True, False)]
    assert {c.compile_cache_dir for c in configs} == {str(tmp_path / "data" / "shared" / "compiled")}


def test_compiling_the_training_is_on_unless_switched_off_and_workers_know_the_bots_rank(tmp_path):
    from bot.app import build_runner

    assert _load(tmp_path).compile_training is True
    runner = build_runner(_load(tmp_path, COMPILE_TRAINING="off", TRAIN_RANK="8", DEVICE="cpu", WORKERS="2"))
    assert [(slot.config.compile_training, slot.config.train_rank) for slot in runner._slots] == [(False, 8)] * 2


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, DATA_DIR=str(blocker / "data"))
    assert info.value.problems[0].startswith(f"DATA_DIR={str(blocker / 'data')!r} is not a writable folder")


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"DISCORD_TOKEN={'y' * 30}\nMAX_PHOTOS=7\nDATA_DIR={tmp_path / 'd'}\n")
    s = load_settings({"MAX_PHOTOS": "9"}, env_file=env_file)
    assert s.discord_token == "y" * 30 and s.max_photos == 9


def test_run_without_token_prints_setup_and_fails(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env["DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=env | {"PYTHONPATH": str(Path.cwd())},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "discord.com/developers/applications" in proc.stderr
    assert "scope=bot+applications.commands" in proc.stderr
    assert "Message Content" in proc.stderr


def test_every_setting_is_documented_in_the_readme():
    from bot.config import ENV_NAMES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert [env for env in ENV_NAMES.values() if f"| `{env}` |" not in readme] == []


def test_a_start_with_fewer_workers_removes_the_folders_of_those_it_no_longer_has(tmp_path):
    """They may hold people's LoRAs and checkpoints that no worker would clear or evict again."""
    from bot.app import build_runner

    work = tmp_path / "data" / "work"
    for i in range(4):
        (work / f"worker-{i}" / "adapters").mkdir(parents=True)
        (work / f"worker-{i}" / "adapters" / "model-7.safetensors").write_bytes(b"lora")
    (work / "worker-notes").mkdir()  # not a worker's folder: left alone
    build_runner(_load(tmp_path, DEVICE="cpu", WORKERS="2"))
    assert sorted(p.name for p in work.iterdir()) == ["worker-0", "worker-1", "worker-notes"]


def test_the_celery_backend_signs_with_job_secret_which_stays_out_of_sight(tmp_path):
    from bot.app import build_runner

    settings = _load(tmp_path, JOB_BACKEND="celery", JOB_SECRET="j" * 40, MAX_JOB_MESSAGE_MB="64")
    assert "j" * 40 not in repr(settings) and _load(tmp_path).job_secret == ""  # not needed by the local backend
    runner = build_runner(settings)
    assert (runner._secret, runner._max_bytes) == (b"j" * 40, 64 * 1024 * 1024)


def test_int8_weights_are_off_unless_asked_for_and_reach_every_worker(tmp_path):
    from bot.app import build_runner

    assert _load(tmp_path).quantize == "none"
    # A Flux base, or one the bot cannot tell without loading it (the worker checks it then).
    for model in ("black-forest-labs/FLUX.1-dev", "tiny-flux", str(tmp_path / "a-folder")):
        assert _load(tmp_path, QUANTIZE="int8", BASE_MODEL=model).quantize == "int8"
    runner = build_runner(_load(tmp_path, QUANTIZE="int8", BASE_MODEL="tiny-flux", DEVICE="cpu", WORKERS="2"))
    assert [slot.config.quantize for slot in runner._slots] == ["int8", "int8"]
