"""Workers' scratch folders: held while their worker runs, swept by the next start once it is gone."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import scratch
from trainer.scratch import LOCK, FolderInUse, held, sweep


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def folder_with(root: Path, name: str, *, lock_file: bool) -> Path:
    folder = root / name
    (folder / "work" / "adapters").mkdir(parents=True)
    (folder / "work" / "adapters" / "someone.safetensors").write_bytes(b"lora")
    if lock_file:
        (folder / LOCK).touch()
    return folder


def test_a_start_removes_the_folders_of_workers_that_no_longer_run_and_only_those(tmp_path):
    root, host = tmp_path / "worker-data", socket.gethostname()
    killed = folder_with(root, f"{host}-{dead_pid()}", lock_file=True)  # its lock died with it
    killed_named = folder_with(root, "gpu1", lock_file=True)
    old_version = folder_with(root, f"{host}-{dead_pid()}", lock_file=False)  # from before locks
    running_old_version = folder_with(root, f"{host}-1", lock_file=False)  # pid 1 runs
    other_host = folder_with(root, f"elsewhere-{dead_pid()}", lock_file=False)
    operators = folder_with(root, "notes", lock_file=False)
    with held(root / "gpu2"):  # a live worker
        with held(root / f"{host}-me"):  # this one, starting
            assert sweep(root) == 3
            assert not killed.exists() and not killed_named.exists() and not old_version.exists()
            assert all(f.exists() for f in (running_old_version, other_host, operators, root / "gpu2",
                                            root / f"{host}-me"))
    assert sweep(tmp_path / "nothing-here") == 0


def test_a_folder_is_held_by_one_worker_at_a_time_and_its_lock_file_goes_with_it(tmp_path):
    folder = tmp_path / "w"
    with held(folder):
        assert (folder / LOCK).exists()
        with pytest.raises(FolderInUse, match="Another worker is using"), held(folder):
            pass
    assert not (folder / LOCK).exists()
    with held(folder):  # free again; a lock file left by a killed worker is taken over too
        pass
    (folder / LOCK).touch()
    with held(folder):
        assert sweep(tmp_path) == 0 and folder.exists()


def test_a_lock_file_is_never_seen_unlocked(tmp_path, monkeypatch):
    """Made and locked aside, then linked into place: a sweep that looks at the moment it appears finds
    it locked, and never removes the folder of a worker that is starting."""
    folder = tmp_path / "worker-data" / "starting"
    folder.mkdir(parents=True)
    link = scratch.os.link

    def sweep_while_linking(source, target):
        link(source, target)
        assert sweep(tmp_path / "worker-data") == 0
    monkeypatch.setattr(scratch.os, "link", sweep_while_linking)
    with held(folder):
        assert folder.exists()
