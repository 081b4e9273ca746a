"""The Dockerfile cannot be built here (no Docker engine), so it is at least linted; the compose file
and the Makefile's set-up are checked too."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_compose_takes_redis_url_from_env_and_falls_back_to_its_own_service():
    text = (ROOT / "docker-compose.yml").read_text()
    assert text.count("REDIS_URL: ${REDIS_URL:-redis://redis:6379/0}") == 2  # the bot and the worker


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
