"""The local backend's worker process: commands in on one pipe, events out on another.

`process_main` is the child-process entry named by `jobs.local_runner.WORKER_ENTRY`. Commands (run,
cancel, evict, stop) are read by a thread, so a cancel reaches a training between two steps; jobs run
one at a time on the main thread; events go back as `(job_id, event)`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from common.logs import setup_logging
from jobs import events
from jobs.commands import Cancel, Command, Evict, Run, Stop
from jobs.events import Event
from jobs.payloads import WorkItem
from jobs.worker_config import WorkerConfig
from trainer.quiet_notices import quiet_known_noise
from trainer.start_news import FIRST_PART, START_NEWS_EVERY_S, start_takes, starting_detail
from trainer.worker import Worker

log = logging.getLogger(__name__)


class Inbox:
    """What the command thread hands the job thread: items to run, adapter keys to evict, or None (stop).

    Entries are taken in order, except that a training takes waiting generations and evictions out of
    turn between its steps, so that a person's /imagine does not wait for someone else's training.
    """

    def __init__(self) -> None:
        self._entries: collections.deque[WorkItem | str | None] = collections.deque()
        self._ready = threading.Condition()

    def put(self, entry: WorkItem | str | None) -> None:
        with self._ready:
            self._entries.append(entry)
            self._ready.notify()

    def get(self) -> WorkItem | str | None:
        with self._ready:
            self._ready.wait_for(lambda: self._entries)
            return self._entries.popleft()

    def waiting_jobs(self) -> list[int]:
        """The ids of the jobs waiting here, oldest first."""
        with self._ready:
            return [entry.job_id for entry in self._entries if isinstance(entry, WorkItem)]

    def take_rider(self) -> WorkItem | str | None:
        """The oldest waiting generation or eviction, or None when there is none."""
        with self._ready:
            for entry in self._entries:
                if isinstance(entry, str) or (isinstance(entry, WorkItem) and entry.kind == "generate"):
                    self._entries.remove(entry)
                    return entry
        return None


def end_process() -> None:
    """End this worker process at once, from any thread, skipping the interpreter's clean-up."""
    os._exit(0)


class StartNews:
    """While the worker starts, jobs sent to it wait in the inbox and are told why: the part under way
    as each begins, and again every START_NEWS_EVERY_S so the minutes shown move. The lock keeps that
    news and a job's arrival in order, and none of it goes out once the start has ended."""

    def __init__(self, inbox: Inbox, send: Callable[[int, Event], None], takes: str) -> None:
        self._inbox, self._send, self._takes = inbox, send, takes
        self._lock = threading.Lock()
        self._began = time.monotonic()
        self._part = FIRST_PART
        self.starting = threading.Event()
        self.starting.set()

    def _tell(self, job_ids: list[int]) -> None:
        """Under the lock: what the start is doing, to these waiting jobs."""
        if self.starting.is_set():
            news = events.Stage("loading_model", starting_detail(self._part, time.monotonic() - self._began, self._takes))
            for job_id in job_ids:
                self._send(job_id, news)

    def moved_on(self, part: str) -> None:
        with self._lock:
            self._part = part
            self._tell(self._inbox.waiting_jobs())

    def retell_until_started(self) -> None:
        """A thread: the start's news again, every START_NEWS_EVERY_S, while it lasts."""
        while self.starting.is_set():
            time.sleep(START_NEWS_EVERY_S)
            with self._lock:
                self._tell(self._inbox.waiting_jobs())

    def arrived(self, item: WorkItem) -> None:
        """Queue `item`, told the news first, so that the job's own events follow it."""
        with self._lock:
            self._tell([item.job_id])
            self._inbox.put(item)

    def ended(self) -> None:
        with self._lock:
            self.starting.clear()


class WorkerProcess:
    """One worker process: a command thread feeds the inbox, this thread runs its jobs one at a time.

    While a training runs, generations sent to this worker ride on it: they are served between its
    steps and its phases (the runner sends at most one per training), on the same loaded model.
    """

    def __init__(self, commands: Connection, event_pipe: Connection, config: WorkerConfig) -> None:
        self.commands, self.event_pipe = commands, event_pipe
        self.worker = Worker(config)
        self.inbox = Inbox()
        self.cancelled: set[int] = set()
        # Set when the bot stops or goes away: the running job stops at its next step and reports
        # nothing, so it stays `running` in the database and is re-queued (from its last checkpoint)
        # when the bot starts again.
        self.stopping = threading.Event()
        self._send_lock = threading.Lock()
        self.news = StartNews(self.inbox, self.send, start_takes(config.device))

    def send(self, job_id: int, event: Event) -> None:
        with self._send_lock:
            self.event_pipe.send((job_id, event))

    def stop(self) -> None:
        """The bot asked this worker to stop, or went away."""
        if self.news.starting.is_set():
            # Before `prepare()` returns no job has run, so there is nothing to finish or report: end
            # at once rather than compile for many more minutes beside the worker a restarted bot
            # starts (inductor writes its cache files whole, so what was compiled so far is kept).
            log.info("worker stopping during its start")
            end_process()
        self.stopping.set()
        self.inbox.put(None)

    def read_commands(self) -> None:
        """A thread: the runner's commands, until it says stop or goes away."""
        while True:
            try:
                message: Command = self.commands.recv()
            except (EOFError, OSError):
                self.stop()
                return
            if isinstance(message, Run):
                self.news.arrived(message.item)
            elif isinstance(message, Cancel):
                self.cancelled.add(message.job_id)
            elif isinstance(message, Evict):
                # The file goes at once (the person may be waiting on /forget); the loaded weights go
                # as soon as no job may be using them.
                self.worker.adapter_file(message.key).unlink(missing_ok=True)
                self.inbox.put(message.key)
            elif isinstance(message, Stop):
                self.stop()
                return

    def serve_riders(self) -> None:
        """Between a training's steps: the generations riding on it, and evictions."""
        while (entry := self.inbox.take_rider()) is not None:
            if isinstance(entry, str):
                self.worker.evict(entry)
            else:
                self.execute(entry)

    def execute(self, item: WorkItem) -> bool:
        """Run one item and report its outcome; False when a shutdown cut it short."""
        job_id = item.job_id

        def should_cancel() -> bool:
            return job_id in self.cancelled or self.stopping.is_set()

        try:
            return self.worker.execute(item, lambda event: self.send(job_id, event), should_cancel,
                                       serve_riders=self.serve_riders if item.kind == "train" else None,
                                       stopping=self.stopping.is_set)
        finally:
            self.cancelled.discard(job_id)

    def run(self) -> None:
        threading.Thread(target=self.read_commands, name="commands", daemon=True).start()
        threading.Thread(target=self.news.retell_until_started, name="start-news", daemon=True).start()
        try:
            self.worker.prepare(on_part=self.news.moved_on)
        except Exception as exc:  # the first job reports it to its owner
            log.error("could not load the base model yet: %s", exc)
        finally:
            self.news.ended()
        while (entry := self.inbox.get()) is not None and not self.stopping.is_set():
            if isinstance(entry, str):
                self.worker.evict(entry)
            elif not self.execute(entry):
                break
        self.worker.stop_compiling()
        log.info("worker stopping")


def process_main(commands: Connection, event_pipe: Connection, config: WorkerConfig) -> None:
    """Child-process entry (`jobs.local_runner.WORKER_ENTRY`)."""
    setup_logging(config.log_level)
    quiet_known_noise()
    if config.cpu_threads:
        import torch

        torch.set_num_threads(config.cpu_threads)
    WorkerProcess(commands, event_pipe, config).run()
