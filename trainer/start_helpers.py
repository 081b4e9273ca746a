"""Start helpers: processes that compile the parts of a GPU worker's start while the worker serves.

A worker compiles generation's stages, their blocks, the square pictures' static-shape code and the
training step (trainer.background_compile). With an empty compile cache that takes many minutes, most of
it single-threaded Python (dynamo's tracing, inductor's lowering), so the worker hands the parts to
helpers: each loads the model, compiles its parts into inductor's on-disk cache, which the worker
shares (`TORCHINDUCTOR_CACHE_DIR`), and reports each part on its stdout as it ends. Meanwhile the
worker serves jobs uncompiled; once a helper has finished a part, the worker reads that part's code
back from the cache, as a restart does, between two jobs (bench/RESULTS.md, "Worker start").

Helpers start only on a GPU, where something compiles, and only as many as the GPU's free memory
and the host's CPUs leave room for (`helper_count`); a part no helper takes, the worker compiles
itself while it is idle. A helper that fails costs nothing but its time: the worker compiles that
part itself. Helpers end with the worker: each one exits when its stdin, held by the worker, closes.
A helper's process is trainer.start_helper_process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jobs.devices import usable_cpus
from jobs.worker_config import WorkerConfig

log = logging.getLogger(__name__)

# The worker's part that is not the engine's (whose parts are named in trainer.engine).
TRAINING = "training"
# What one process compiling a part may take: the model (2-3 GiB in bf16 for SD1.5), the warm-up's
# pictures or one training step, CUDA's context and inductor's benchmarking; and CPUs enough that the
# processes do not slow each other down (inductor compiles Triton kernels in a pool of its own).
GPU_GIB_PER_PROCESS = 6.0
CPUS_PER_PROCESS = 4
DONE, FAILED = "done", "failed"
# Seconds for the lines a helper wrote before it exited to be read, before its unreported parts fail.
EXIT_GRACE_S = 2.0


def helper_count(wanted: int, parts: int, cpus: int, free_gpu_gib: float) -> int:
    """How many helpers to start for `parts` groups of parts: `wanted` (below 0: as many as fit
    beside the worker in `free_gpu_gib` of GPU memory and `cpus` CPUs), never more than there are
    groups."""
    fit = min(cpus // CPUS_PER_PROCESS, int(free_gpu_gib // GPU_GIB_PER_PROCESS)) - 1
    return max(0, min(fit if wanted < 0 else wanted, parts))


def groups(parts: Sequence[str]) -> list[list[str]]:
    """The parts each helper would take, the longest first: the training step, the square pictures together (they share the decoder's compiling), then each other
    part on its own."""
    squares = [part for part in parts if part.startswith("square-")]
    ordered = [[TRAINING]] if TRAINING in parts else []
    ordered += [squares] if squares else []
    return ordered + [[part] for part in parts if part != TRAINING and part not in squares]


class Helpers:
    """The helpers of one start: which parts each compiles, and what they have reported so far."""

    def __init__(self, processes: dict[subprocess.Popen[bytes], list[str]], scratch: list[Path],
                 on_end: Callable[[str], None] = lambda part: None) -> None:
        """`on_end(part)` is called (on a thread of this object's) as each part ends, done or failed."""
        self._processes = processes
        self._scratch = scratch
        self._on_end = on_end
        self._ended: dict[str, threading.Event] = {
            part: threading.Event() for parts in processes.values() for part in parts}
        self._failed: set[str] = set()
        self._lock = threading.Lock()
        for process, parts in processes.items():
            threading.Thread(target=self._read, args=(process, parts), name="start-helper", daemon=True).start()
            threading.Thread(target=self._watch, args=(process, parts), name="start-helper-exit",
                             daemon=True).start()

    def _read(self, process: subprocess.Popen[bytes], parts: list[str]) -> None:
        """Each part's end as the helper reports it; all of its parts end when it does."""
        assert process.stdout is not None
        for line in process.stdout:
            outcome, _, part = line.decode(errors="replace").strip().partition(" ")
            if outcome in (DONE, FAILED) and part in self._ended:
                self._end(part, failed=outcome == FAILED)
        self._unreported_failed(parts)

    def _watch(self, process: subprocess.Popen[bytes], parts: list[str]) -> None:
        """A helper's parts end when it does, even while its stdout stays open: processes it started
        (inductor's compile workers) may hold that pipe after it died. What it reported before
        exiting is read within the grace time."""
        process.wait()
        time.sleep(EXIT_GRACE_S)
        self._unreported_failed(parts)

    def _unreported_failed(self, parts: list[str]) -> None:
        for part in parts:
            self._end(part, failed=True)

    def _end(self, part: str, *, failed: bool) -> None:
        """Mark `part` ended (once: its reader and its process's watcher may both try)."""
        with self._lock:
            if self._ended[part].is_set():
                return
            if failed:
                self._failed.add(part)
            self._ended[part].set()
        self._on_end(part)

    def owns(self, part: str) -> bool:
        return part in self._ended

    def ended(self, part: str) -> bool:
        """Whether the helper owning `part` has finished it, or failed it (False for a part no helper has)."""
        return part in self._ended and self._ended[part].is_set()

    def compiled(self, part: str) -> bool:
        """Whether a helper compiled `part` into the cache: it ended without failing."""
        return self.ended(part) and part not in self._failed

    def close(self) -> None:
        """End the helpers (at once if still compiling: their stdin closes) and remove their files."""
        for process in self._processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self._processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for folder in self._scratch:
            shutil.rmtree(folder, ignore_errors=True)


def free_gpu_gib(device: str) -> float:
    """GPU memory free on `device` now, in GiB; 0 for a CPU or MPS device."""
    if not device.startswith("cuda"):
        return 0.0
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free / 2**30


def helper_command(config: WorkerConfig, parts: Sequence[str]) -> list[str]:
    """The command line of a helper compiling `parts` with `config`."""
    command = [sys.executable, "-m", "trainer.start_helper_process",
               "--config", json.dumps(dataclasses.asdict(config))]
    for part in parts:
        command += ["--part", part]
    return command


def start(config: WorkerConfig, parts: Sequence[str], device: str,
          on_end: Callable[[str], None] = lambda part: None) -> Helpers:
    """Helpers compiling `parts` (the parts of the worker's start), as many as `config.start_helpers`
    asks and `device` and the worker's share of the host's CPUs leave room for (each helper's command
    line is `helper_command`'s), `on_end` hearing each part as it ends. The caller closes them."""
    by_helper = groups(parts)
    count = 0
    if by_helper and config.start_helpers != 0:
        cpus = usable_cpus() // max(1, config.workers_on_host)
        count = helper_count(config.start_helpers, len(by_helper), cpus, free_gpu_gib(device))
    processes: dict[subprocess.Popen[bytes], list[str]] = {}
    scratch: list[Path] = []
    try:
        for owned in by_helper[:count]:
            # A folder of its own: a worker clears its folder's files as it starts (trainer.worker).
            Path(config.work_dir).mkdir(parents=True, exist_ok=True)
            scratch.append(Path(tempfile.mkdtemp(prefix="start-helper-", dir=config.work_dir)))
            own = dataclasses.replace(config, work_dir=str(scratch[-1]), start_helpers=0)
            process = subprocess.Popen(helper_command(own, owned), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            processes[process] = owned
            log.info("started a helper compiling %s", ", ".join(owned))
        return Helpers(processes, scratch, on_end)
    except BaseException:
        Helpers(processes, scratch).close()
        raise
