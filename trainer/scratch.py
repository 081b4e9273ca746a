"""Workers' scratch folders: each held by a lock while its worker runs; a start removes dead workers'.

A Celery worker without --work-dir works in `worker-data/<name>` (by default `<host>-<pid>`, a new
folder at every start) and removes it when it stops. One that is killed (kill -9, a crash, a power
cut) leaves it behind with what it held: people's checkpoints and cached LoRA files, which no later
/forget would reach. So each worker holds an exclusive lock (flock) on `.lock` in its folder while it
runs, which the kernel lets go of when the process dies whatever becomes of its pid, and every worker
start removes the folders under `worker-data/` whose lock nobody holds. A folder without a lock file
(left by a version without locks) goes only when its name is `<this host>-<pid>` and no process has
that pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import TrainerError

log = logging.getLogger(__name__)

WORKER_DATA = Path("worker-data")  # relative to the working directory, as --work-dir's default says
LOCK = ".lock"


class FolderInUse(TrainerError):
    code = "folder_in_use"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one at `path` (a sweep may have removed it meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _create_locked(path: Path) -> int | None:
    """Create `path` already locked (made and locked aside, then linked into place, so nobody ever sees
    it unlocked); None when another process created it first."""
    aside = path.with_name(f"{path.name}.{os.getpid()}")
    fd = os.open(aside, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(aside, path)
    except FileExistsError:
        os.close(fd)
        return None
    finally:
        aside.unlink(missing_ok=True)
    return fd


def _lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its lock; None when a live process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd_new = _create_locked(path)
            if fd_new is not None:
                return fd_new
            continue
        if not _try_lock(fd):
            os.close(fd)
            return None
        if _is_at(fd, path):
            return fd
        os.close(fd)


@contextmanager
def held(folder: Path) -> Iterator[None]:
    """Hold `folder` as this process's scratch space for the block; FolderInUse if a live worker has it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder / LOCK)
    if fd is None:
        raise FolderInUse(f"Another worker is using {folder}; give each worker its own --name or --work-dir.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK).unlink()
        os.close(fd)


def _dead_default_name(name: str) -> bool:
    """`<this host>-<pid>` of a process that no longer runs."""
    host, _, pid = name.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def sweep(root: Path = WORKER_DATA) -> int:
    """Remove the folders under `root` of workers that no longer run; return how many went."""
    if not root.is_dir():
        return 0
    removed = 0
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except FileNotFoundError:
            if _dead_default_name(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
                removed += not folder.exists()
            continue
        try:
            if _try_lock(fd):  # its worker is gone: hold the lock while its folder goes
                shutil.rmtree(folder, ignore_errors=True)
                removed += not folder.exists()
        finally:
            os.close(fd)
    if removed:
        log.info("removed the scratch folders of %d worker(s) that no longer run", removed)
    return removed
