"""The Dockerfile cannot be built here (no Docker engine), so it is at least linted; the compose file,
the lock file the image installs from and the Makefile's set-up are checked too."""

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

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
    assert included == copied == {"requirements.lock", *packages}
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


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments): comments dropped, continued lines joined."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    keywords_and_args = (line.strip().partition(" ") for line in joined.splitlines() if line.strip())
    return [(keyword.upper(), args.strip()) for keyword, _, args in keywords_and_args]


def _base_image() -> str:
    [base] = [args.split()[0] for keyword, args in _instructions() if keyword == "FROM"]
    return base


def _image_env() -> dict[str, str]:
    pairs = [token.partition("=") for keyword, args in _instructions() if keyword == "ENV" for token in shlex.split(args)]
    assert all(sep for _, sep, _ in pairs), "ENV in the KEY=value form only"
    return {name: value for name, _, value in pairs}


def test_the_image_starts_from_a_slim_python_release_not_a_cuda_image():
    """torch's wheels bring their own CUDA and cuDNN: a CUDA base image would only add a second copy.
    A tag naming the Python release (or a digest), never a moving one such as `latest` or `3`."""
    base = _base_image()
    assert not base.startswith(("nvidia/", "nvcr.io/")), base
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base


def test_the_image_asks_the_nvidia_toolkit_for_the_gpus_and_the_compute_driver():
    """The nvidia/cuda images set these; on any other base, without them the NVIDIA runtime mounts
    no GPU (`--runtime=nvidia`) or only nvidia-smi's libraries, not libcuda."""
    env = _image_env()
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))


def test_the_image_can_build_tritons_kernel_launchers():
    """Triton compiles a small C launcher when the worker compiles the model: it needs a C compiler,
    libc's headers (not pulled in by gcc without recommends) and Python's (in the python image)."""
    [apt] = [args for keyword, args in _instructions() if keyword == "RUN" and "apt-get install" in args]
    assert {"gcc", "libc6-dev"} <= set(apt.split())
    assert _base_image().startswith("python:")


def test_the_image_installs_exactly_the_locked_wheels():
    """Two builds install the same bytes: every package from requirements.lock, checked against its
    hashes, wheels only (nothing built from source), and no unpinned upgrade of pip on the way."""
    instructions = _instructions()
    [install] = [args for keyword, args in instructions if keyword == "RUN" and "pip install" in args]
    assert {"--require-hashes", "--only-binary=:all:"} <= set(install.split())
    assert re.search(r"(^|\s)-r requirements\.lock(\s|$)", install)
    assert "requirements.txt" not in install and "--upgrade" not in install and install.count("pip install") == 1
    copies = [args.split()[-2] for keyword, args in instructions if keyword == "COPY"]
    assert "requirements.lock" in copies and "requirements.txt" not in copies


@dataclass
class _Locked:
    """One package of requirements.lock: its pin, its hashes, and what it is there for (`# via`)."""

    requirement: Requirement
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)

    @property
    def version(self) -> Version:
        return Version(next(iter(self.requirement.specifier)).version)


def _parse_lock(text: str) -> dict[NormalizedName, _Locked]:
    """requirements.lock as `make lock` writes it: `name==version \\`, then its `--hash=` lines and a
    `# via` block naming what needs it (`-r requirements.txt` for a direct requirement)."""
    entries: dict[NormalizedName, _Locked] = {}
    current: _Locked | None = None
    for line in text.splitlines():
        body = line.strip().rstrip("\\").strip()
        if not body or (line.startswith("#") and current is None):
            continue  # the header
        if not line[0].isspace():
            current = _Locked(Requirement(body))
            entries[canonicalize_name(current.requirement.name)] = current
        elif current is not None and body.startswith("--hash="):
            current.hashes.append(body.removeprefix("--hash="))
        elif current is not None and body.startswith("#"):
            named = re.sub(r"^via\b", "", body.removeprefix("#").strip()).strip()
            if named:
                current.via.add(named)
    return entries


def _requirements(text: str) -> dict[NormalizedName, Requirement]:
    requirements = (Requirement(line.split("#", 1)[0].strip()) for line in text.splitlines()
                    if line.split("#", 1)[0].strip() and not line.startswith("-"))
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def _lock_problems(requirements_text: str, lock_text: str) -> list[str]:
    """Why the lock is not requirements.txt's: an entry not pinned to one version with hashes, a
    requirement missing or pinned outside its range, or a direct requirement no longer asked for."""
    requirements = _requirements(requirements_text)
    lock = _parse_lock(lock_text)
    problems = []
    for name, locked in lock.items():
        specifiers = list(locked.requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            problems.append(f"{name} is not pinned to one version")
        if locked.requirement.marker is not None:
            problems.append(f"{name} is locked with a marker")
        if not locked.hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in locked.hashes):
            problems.append(f"{name} has no sha256 hash")
        if "-r requirements.txt" in locked.via and name not in requirements:
            problems.append(f"{name} is locked for requirements.txt, which no longer names it")
    for name, requirement in requirements.items():
        if name not in lock:
            problems.append(f"{name} is not in requirements.lock")
            continue
        version = lock[name].version
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{name} is locked to {version}, outside {requirement.specifier}")
        if "-r requirements.txt" not in lock[name].via:
            problems.append(f"{name} is not locked as a requirement of requirements.txt")
    return problems


def test_the_lock_pins_every_requirement_within_its_range_with_hashes():
    """Fails after an edit to requirements.txt that `make lock` has not followed."""
    problems = _lock_problems((ROOT / "requirements.txt").read_text(), (ROOT / "requirements.lock").read_text())
    assert problems == [], "run `make lock`: " + "; ".join(problems)


def test_an_edit_to_the_requirements_without_relocking_is_caught():
    requirements = (ROOT / "requirements.txt").read_text()
    lock = (ROOT / "requirements.lock").read_text()
    assert _lock_problems(requirements + "boto3>=1.34\n", lock) == ["boto3 is not in requirements.lock"]
    torch_version = _parse_lock(lock)["torch"].version
    narrowed = re.sub(r"^torch(?![\w-])[^\n#]*", f"torch>{torch_version},<3", requirements, flags=re.M)  # not torchao
    assert _lock_problems(narrowed, lock) == [f"torch is locked to {torch_version}, outside <3,>{torch_version}"]
    without_tqdm = re.sub(r"^tqdm\b[^\n]*\n", "", requirements, flags=re.M)
    assert _lock_problems(without_tqdm, lock) == ["tqdm is locked for requirements.txt, which no longer names it"]
    unhashed = re.sub(r"^(aiosqlite==[^ ]+) \\\n(\s+--hash=[^\n]*\n)+", r"\1\n", lock, flags=re.M)
    assert _lock_problems(requirements, unhashed) == ["aiosqlite has no sha256 hash"]


def test_torch_is_locked_to_the_pypi_cuda_build_with_its_own_cuda_libraries():
    """PyPI's Linux torch wheels are CUDA builds whose CUDA, cuDNN and NCCL come as nvidia-* wheels:
    with those locked the slim image has everything CUDA needs but the host's driver. A local
    version (`+cpu`, `+cu130`) is never on PyPI."""
    lock = _parse_lock((ROOT / "requirements.lock").read_text())
    assert lock["torch"].version.local is None
    for library in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn", "nvidia-nccl"):
        assert any(name.startswith(library) for name in lock), library
    assert "triton" in lock  # torch.compile's GPU kernels


def test_the_lock_is_resolved_for_the_images_python_and_platform():
    """`make lock` resolves for the image from any machine: the Python of the Dockerfile's base, Linux
    on x86_64 (nvidia-* wheels are Linux-only: a lock made for the host's own platform could miss them)."""
    release = re.fullmatch(r"python:(3\.\d+)\..*", _base_image())
    assert release, _base_image()
    python = release.group(1)
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    [compile_line] = [line for line in makefile.splitlines() if "pip compile" in line]
    assert f"--python-version {python} " in compile_line
    assert "--python-platform x86_64-manylinux_" in compile_line and "--generate-hashes" in compile_line
    assert compile_line.rstrip().endswith("--output-file requirements.lock requirements.txt")


def test_the_readme_names_the_base_image_and_the_cuda_the_host_driver_must_support():
    """Re-locking to a torch built for another CUDA changes which drivers work: the README says so."""
    readme = (ROOT / "README.md").read_text()
    assert _base_image().partition("@")[0] in readme
    lock = _parse_lock((ROOT / "requirements.lock").read_text())
    [cudart] = [locked.version for name, locked in lock.items() if name.startswith("nvidia-cuda-runtime")]
    torch = lock["torch"].version
    assert f"CUDA {cudart.major}.{cudart.minor} for torch {torch.major}.{torch.minor}" in readme
