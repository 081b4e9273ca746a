"""The Dockerfile cannot be built here (no Docker engine), so it is at least linted."""

import shutil
import subprocess
import sys
from pathlib import Path

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
