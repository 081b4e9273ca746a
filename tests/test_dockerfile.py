"""The Dockerfile cannot be built here (no Docker engine), so it is at least linted; the compose file
and the Makefile's set-up are checked too."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_reserves_one_gpu_and_mounts_volumes():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "driver: nvidia" in text and "count: 1" in text
    assert "/data" in text and "/hf-cache" in text


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_takes_redis_url_from_env_and_falls_back_to_its_own_service_with_its_password():
    services = _compose()["services"]
    for name in ("bot", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == "${REDIS_URL:-redis://:${REDIS_PASSWORD:-}@redis:6379/0}"


def test_compose_runs_the_bot_and_the_worker_under_an_init_with_bounded_restarts():
    """`init`: signals reach the bot (PID 1 ignores SIGTERM without a handler) and orphans are
    reaped. A missing or refused token exits 2: `on-failure:N` stops retrying, `unless-stopped`
    would restart it for ever."""
    services = _compose()["services"]
    for name in ("bot", "worker"):
        assert services[name]["init"] is True
    for name, service in services.items():
        policy, _, retries = service["restart"].partition(":")
        assert policy == "on-failure" and 1 <= int(retries) <= 10, name


def test_the_worker_gets_only_what_it_reads_and_never_the_discord_token():
    worker = _compose()["services"]["worker"]
    assert "env_file" not in worker
    environment = worker["environment"]
    assert not any("DISCORD" in name for name in environment)
    read = set(re.findall(r'env\.get\("([A-Z_]+)"', (ROOT / "trainer" / "cli.py").read_text()))
    assert read and read <= set(environment), read - set(environment)
    assert {"JOB_SECRET", "HF_HOME"} <= set(environment)


def _redis_script() -> str:
    """The compose Redis's shell command as the container runs it (compose turns `$$` into `$`)."""
    redis = _compose()["services"]["redis"]
    assert redis["command"][:2] == ["sh", "-c"]
    return redis["command"][2].replace("$$", "$")


def _run_redis_script(tmp_path, password: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run that command with a stand-in `redis-server` that records the arguments it was given."""
    stub = tmp_path / "redis-server"
    args = tmp_path / "args"
    stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {args}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **({"REDIS_PASSWORD": password} if password is not None else {})}
    done = subprocess.run(["sh", "-c", _redis_script()], env=env, capture_output=True, text=True, timeout=30)
    return done, args.read_text().split("\n")[:-1] if args.exists() else []


def test_the_compose_redis_refuses_to_start_without_a_password(tmp_path):
    for password in (None, ""):
        done, args = _run_redis_script(tmp_path, password)
        assert done.returncode == 2 and "Set REDIS_PASSWORD in .env" in done.stderr and args == []


def test_the_compose_redis_asks_for_the_password_and_writes_no_aof_or_rdb(tmp_path):
    """Its queue holds people's photos: nothing of it may outlive the process on disk."""
    done, args = _run_redis_script(tmp_path, "s3cret-Pw_1")
    assert done.returncode == 0, done.stderr
    assert args == ["--requirepass", "s3cret-Pw_1", "--appendonly", "no", "--save", "", "--proto-max-bulk-len", "256mb"]
    compose = _compose()
    assert "volumes" not in compose["services"]["redis"]
    assert set(compose["volumes"]) == {"avatar-data", "hf-cache"}


def test_the_image_has_a_healthcheck_on_the_bots_heartbeat():
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    [check] = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert '"-m", "bot.health"' in check and "--interval=" in check and "--start-period=" in check
    assert any("HEARTBEAT_FILE=/tmp/" in line for line in lines if line.startswith("ENV"))
    assert (ROOT / "bot" / "health.py").is_file()


def _make_run_with_a_python(tmp_path, version_ok: bool, venv_fails: bool):
    """`make run` with a stand-in python3: it answers the version check (`-c ...`) with `version_ok`,
    and `-m venv DIR` makes DIR/bin/python, then fails if `venv_fails` (no pip: python3-venv missing)."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit {0 if version_ok else 1}\n'
                    f'mkdir -p "$3/bin" && touch "$3/bin/python"\nexit {1 if venv_fails else 0}\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-C", str(ROOT), "run", f"VENV={venv}", f"PYTHON={fake}"],
                          capture_output=True, text=True, timeout=60)
    return done, venv


def test_make_removes_a_half_made_environment_and_says_what_to_install(tmp_path):
    """Where python3-venv is missing, `python3 -m venv` leaves a folder with a python and no pip;
    the next `make run` must not take that folder for a finished environment."""
    done, venv = _make_run_with_a_python(tmp_path, version_ok=True, venv_fails=True)
    assert done.returncode != 0 and not venv.exists()
    assert "sudo apt install python3-venv" in done.stderr


def test_make_refuses_a_python_older_than_3_11_before_setting_anything_up(tmp_path):
    done, venv = _make_run_with_a_python(tmp_path, version_ok=False, venv_fails=False)  # a Python 3.10
    assert done.returncode != 0 and not venv.exists()
    assert "needs Python 3.11 or later" in done.stderr


def test_the_build_context_holds_only_what_the_image_copies():
    """Secrets (.env) and people's data (data/, worker-data/) never reach the Docker builder, and
    everything the Dockerfile copies does."""
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*"  # everything out, then only what the image needs back in
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {line.split()[2].rstrip("/") for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert included == copied == {"requirements.txt", *packages}
    assert {"bot", "jobs", "trainer", "photos", "storage", "common"} <= packages


def test_compose_publishes_redis_on_loopback_unless_told_a_private_address():
    """Workers on other machines need Redis reachable; by default nothing outside this host reaches it."""
    assert '"${REDIS_BIND:-127.0.0.1}:6379:6379"' in (ROOT / "docker-compose.yml").read_text()


def test_the_image_installs_no_gui_libraries_for_a_headless_opencv():
    """libGL and GLib are what the GUI build of OpenCV links; the headless wheel needs neither."""
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^opencv-python-headless\b", requirements, re.M)
    assert not re.search(r"^opencv-python\b(?!-headless)", requirements, re.M)
    apt = re.search(r"apt-get install[^\n]*", (ROOT / "Dockerfile").read_text()).group(0)
    assert "libgl" not in apt.lower() and "libglib" not in apt.lower()
