"""Photo intake in a few worker processes, each capped in memory and in time.

Decoding an upload is where a hostile file costs the most: a picture that compresses to a few
kilobytes can need gigabytes, and a JPEG can keep libjpeg busy for minutes. Intake checks what it
can from the header first (photos/intake.py); this module bounds what is left. `IntakePool` keeps
`processes` children, started with `spawn` (a fresh interpreter, not a fork of the bot with its
threads and sockets), and each of them:

- caps its address space (RLIMIT_AS, `MEMORY_CAP_BYTES`): an allocation past it fails with a
  MemoryError in the child instead of swapping the host; the photo is refused as 'too_costly';
- caps the CPU time of each photo (RLIMIT_CPU, `CPU_SECONDS`): past it the kernel ends the child
  (SIGXCPU);
- is given `TIMEOUT_S` of wall-clock time per photo, after which the parent kills it.

A child that dies, is killed or ran out of memory is replaced at once; its photo is refused as
'too_costly', and the photos queued for or running in the other children carry on. The bot's
event loop and its default thread pool (which also serve /photos, /forget and Redis) never decode:
a photo waits for a free child, and the pool's own threads only wait on pipes.

Only module-level functions run in a child (they travel by name), and they take and return
picklable values: `photos.intake.normalise_or_refuse` is bytes in, a `NormalisedPhoto` or a
`Refusal` out. This module imports no imaging library itself: a child caps its memory and threads
before the first one loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from common.child_env import secrets_withheld

if TYPE_CHECKING:
    from photos.intake import IntakeLimits, NormalisedPhoto, Refusal

log = logging.getLogger(__name__)

T = TypeVar("T")

MEMORY_CAP_BYTES = 1024 * 1024 * 1024
"""Address space of one intake child. Python with Pillow, NumPy, OpenCV and libheif loaded maps
about 310 MB; the largest photos intake accepts peak at 610-710 MB of address space (a 50 MP
progressive 4:4:4 JPEG, a 48 MP HEIC, a 25 MP WebP; bench/RESULTS.md), and
IntakeLimits.max_decode_bytes refuses anything larger from its header. 1 GiB leaves room for
those and stops everything else."""

CPU_SECONDS = 10
"""CPU time one photo may take. The largest accepted photos take under 1.5 s on a shared 2-core
host; a refused bomb takes milliseconds, as its header gives it away."""

TIMEOUT_S = 30.0
"""Wall-clock time one photo may take in a child, waiting for a busy CPU included."""

START_TIMEOUT_S = 120.0
"""Time a new child may take to start (imports and the face cascade), on a busy host."""

_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Thread pools NumPy's and OpenCV's libraries would start per core: one photo uses one core, and
each thread would reserve stack and malloc arenas against the address-space cap."""

FailureReason = Literal["memory", "timeout", "died"]
_FAILURES: dict[FailureReason, str] = {"memory": "ran out of memory", "timeout": "ran out of time",
                                       "died": "ended its process"}


@dataclass(frozen=True)
class Finished(Generic[T]):
    """What a function returned in a child, with the child's peak resident memory while it ran."""

    value: T
    peak_rss_bytes: int


class ChildFailed(Exception):
    """The child running a task ran out of memory or time, or died; it has been replaced."""

    def __init__(self, reason: FailureReason, peak_rss_bytes: int | None = None) -> None:
        super().__init__(reason)
        self.reason: FailureReason = reason
        self.peak_rss_bytes = peak_rss_bytes


@dataclass(frozen=True)
class IntakeResult:
    """The outcome of one photo in the pool; `peak_rss_bytes` is None when its child died."""

    outcome: NormalisedPhoto | Refusal
    peak_rss_bytes: int | None


# --- in the child --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    function: Callable[..., Any]
    args: tuple[Any, ...]
    cpu_seconds: int


@dataclass(frozen=True)
class _Ready:
    pid: int


@dataclass(frozen=True)
class _OutOfMemory:
    peak_rss_bytes: int


@dataclass(frozen=True)
class _Crashed:
    error: str


def _peak_rss_bytes() -> int:
    """The child's peak resident memory since `_reset_peak_rss`: VmHWM where /proc has it. Not
    ru_maxrss, which Linux carries across exec: a spawned child's starts at its parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: the lifetime peak


def _reset_peak_rss() -> None:
    """Start the child's peak-memory count afresh, so each task reports its own (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # elsewhere the peak is the child's lifetime peak: an upper bound
        pass


def _cap_cpu(seconds: int) -> None:
    """Let the next task use `seconds` more of CPU time (RLIMIT_CPU counts the process's lifetime)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _child_main(conn: Connection, memory_bytes: int, log_level: int) -> None:
    """A child's life: cap itself, load intake, then run tasks until the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the bot, which stops its children
    for name in _ONE_THREAD:
        os.environ[name] = "1"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a child ended for its CPU time leaves no core file
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    from common.logs import setup_logging
    from photos import faces

    setup_logging(log_level)
    faces.warm_up(threads=1)
    conn.send(_Ready(os.getpid()))
    while True:
        try:
            task: _Task = conn.recv()
        except EOFError:  # the parent closed the pipe or exited
            return
        _reset_peak_rss()
        _cap_cpu(task.cpu_seconds)
        reply: Finished[Any] | _OutOfMemory | _Crashed
        try:
            reply = Finished(task.function(*task.args), _peak_rss_bytes())
        except MemoryError:
            reply = _OutOfMemory(_peak_rss_bytes())
        except Exception as exc:  # a bug, not a bad photo (intake turns those into refusals)
            log.exception("intake task %s failed", getattr(task.function, "__name__", "?"))
            reply = _Crashed(type(exc).__name__)
        conn.send(reply)
        if isinstance(reply, _OutOfMemory):
            return  # the heap may be left fragmented near the cap: a fresh child takes over


# --- in the parent -------------------------------------------------------------------------------


def _ended(process: Any) -> bool:
    """Whether a child process has exited, from its sentinel pipe.

    Not `is_alive()`: multiprocessing reaps finished children whenever any process is started (in
    this pool or elsewhere in the bot), and a `waitpid` that loses that race reads as "alive".
    """
    return bool(mp_wait([process.sentinel], timeout=0))


@dataclass
class _Child:
    """One slot of the pool: its current process and the parent's end of their pipe."""

    index: int
    process: Any = None
    conn: Connection | None = None
    ready: bool = False


class IntakePool:
    """`processes` capped children that run intake tasks, one at a time each, in arrival order.

    The pool has one thread per child, which only waits on that child's pipe; tasks queue in
    arrival order for the next free thread. Nothing ties the pool to one event loop.
    """

    def __init__(self, processes: int = 2, *, memory_bytes: int = MEMORY_CAP_BYTES, cpu_seconds: int = CPU_SECONDS,
                 timeout_s: float = TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if processes < 1:
            raise ValueError("an intake pool needs at least one process")
        self.processes = processes
        self._memory_bytes, self._cpu_seconds = memory_bytes, cpu_seconds
        self._timeout_s, self._start_timeout_s = timeout_s, start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._children = [_Child(i) for i in range(processes)]
        self._free: queue.SimpleQueue[_Child] = queue.SimpleQueue()  # as many threads as children: never waits
        self._threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # start/close, and the children's processes swapped by the threads
        self._closed = False

    @property
    def pids(self) -> list[int | None]:
        """The children's process ids (None for a slot between two children)."""
        with self._lock:
            return [c.process.pid if c.process is not None else None for c in self._children]

    def start(self) -> None:
        """Start the children (they load intake in the background); the first `run` calls it too."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the intake pool is closed")
            if self._threads is not None:
                return
            self._threads = ThreadPoolExecutor(self.processes, thread_name_prefix="intake-pool")
        for child in self._children:
            self._spawn(child)
            self._free.put(child)

    async def normalise(self, data: bytes, limits: IntakeLimits) -> IntakeResult:
        """Normalise one upload in a child; running out of memory or time is a 'too_costly' refusal."""
        from photos.intake import Refusal, normalise_or_refuse, too_costly

        try:
            done = await self.run(normalise_or_refuse, data, limits)
        except ChildFailed as failure:
            log.info("refused a photo whose intake %s", _FAILURES[failure.reason])
            return IntakeResult(Refusal.of(too_costly()), failure.peak_rss_bytes)
        return IntakeResult(done.value, done.peak_rss_bytes)

    async def run(self, function: Callable[..., T], *args: Any) -> Finished[T]:
        """Run `function(*args)` in the next free child.

        Raises ChildFailed when the child runs out of memory or time or dies (it is replaced), and
        RuntimeError when the function raised (logged in the child) or the pool is closed.
        """
        self.start()
        task = _Task(function, args, self._cpu_seconds)
        # A caller that stops waiting takes its task out of the queue if it has not started yet; a
        # started one runs to its end, and its child goes back to the free list either way.
        reply = await asyncio.get_running_loop().run_in_executor(self._threads, self._exchange, task)
        if isinstance(reply, _Crashed):
            raise RuntimeError(f"intake task {getattr(function, '__name__', '?')} failed in its process: {reply.error}")
        return reply

    def _exchange(self, task: _Task) -> Finished[Any] | _Crashed:
        """In a pool thread: hand `task` to a free child and wait for its reply, replacing it if it fails."""
        child = self._free.get()
        try:
            return self._exchange_with(child, task)
        finally:
            self._free.put(child)

    def _exchange_with(self, child: _Child, task: _Task) -> Finished[Any] | _Crashed:
        if child.conn is None or self._closed:
            raise RuntimeError("the intake pool is closed")
        if _ended(child.process):  # while idle (killed from outside): not this photo's doing
            log.warning("intake process %d ended while idle (exit code %s); replacing it", child.index,
                        self._replace(child))
        if not child.ready:
            self._await_ready(child)
        conn = child.conn
        if conn is None:
            raise RuntimeError("the intake pool is closed")
        try:
            conn.send(task)
            if not conn.poll(self._timeout_s):
                log.warning("intake process %d took over %g s on one photo; replacing it", child.index,
                            self._timeout_s)
                self._replace(child)
                raise ChildFailed("timeout")
            reply = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._replace(child)
            log.warning("intake process %d ended (exit code %s) during a task; replacing it", child.index, code)
            raise ChildFailed("timeout" if code == -signal.SIGXCPU else "died") from exc
        if isinstance(reply, _OutOfMemory):
            self._replace(child)
            raise ChildFailed("memory", reply.peak_rss_bytes)
        return reply

    def _await_ready(self, child: _Child) -> None:
        """Wait for a new child to load intake. One that cannot start is the host's problem, not
        the photo's: RuntimeError (the person is told something went wrong on the bot's side)."""
        assert child.conn is not None
        try:
            if child.conn.poll(self._start_timeout_s) and isinstance(child.conn.recv(), _Ready):
                child.ready = True
                return
            problem = f"did not start within {self._start_timeout_s:g} s"
        except (EOFError, OSError):
            problem = "ended while starting"
        code = self._replace(child)
        raise RuntimeError(f"intake process {child.index} {problem} (exit code {code})")

    def _spawn(self, child: _Child) -> None:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_child_main, name=f"intake-{child.index}", daemon=True,
                                    args=(theirs, self._memory_bytes, logging.getLogger().getEffectiveLevel()))
        with secrets_withheld():
            process.start()
        theirs.close()
        with self._lock:
            child.process, child.conn, child.ready = process, ours, False
        log.debug("started intake process %d (pid %d)", child.index, process.pid)

    def _replace(self, child: _Child) -> int | None:
        """End `child`'s process (if it still runs) and start another in its slot; returns the exit code."""
        code = self._stop(child)
        if not self._closed:
            self._spawn(child)
        return code

    def _stop(self, child: _Child) -> int | None:
        with self._lock:
            process, conn = child.process, child.conn
            child.process, child.conn, child.ready = None, None, False
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if not _ended(process):
            process.kill()
        process.join()
        code: int | None = process.exitcode
        with contextlib.suppress(ValueError):  # "still running": reaped by another thread (see _ended)
            process.close()
        return code

    async def close(self) -> None:
        """Stop every child; a photo in progress is refused as if its child had died."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.to_thread(self._stop_all)

    def _stop_all(self) -> None:
        # Kill first, without touching the pipes: a pool thread waiting on one sees the end of its
        # child and lets go of it; only then are the pipes closed and the processes reaped.
        with self._lock:
            running = [c.process for c in self._children if c.process is not None]
        for process in running:
            if not _ended(process):
                process.kill()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        for child in self._children:
            self._stop(child)
