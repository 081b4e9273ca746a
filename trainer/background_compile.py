"""Compiling a worker's parts while it serves: a worker takes jobs as soon as its model is loaded.

A worker's compiled code (generation's stages and blocks, the square pictures' static-shape code,
the training step: trainer.compiled_blocks) takes many minutes to compile on a new machine. Nobody
should wait for that: the worker serves at once on the uncompiled path (eager, with CUDA graphs on a
GPU), while start helpers (trainer.start_helpers) compile the parts into inductor's on-disk cache in
processes of their own. As each helper finishes a part, this object's thread *adopts* it: with the
worker's job lock held, so between two jobs, it runs the part once in the worker's process, which
reads the compiled code back from the cache instead of compiling it, and from then on the worker uses
it. A part no helper took (no room for one on this GPU or host) is compiled in the worker's process
the same way, while no job runs.

A training that is under way when the helper of the training step finishes does not wait for its
end: it switches to the compiled step between two steps (trainer.training_step, `compile_when`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from trainer.start_helpers import Helpers
from trainer.start_report import StartReport, helper_compiled

log = logging.getLogger(__name__)


class BackgroundCompile:
    """The compiling parts of one worker, in the order they are wanted, and the thread adopting them.

    `adopt(part)` runs a part in the worker's process (reading it from the cache where a helper
    compiled it); it is called with `lock` held, the lock the worker holds while it runs a job.
    `after(part)` names, for a part, the one that must be adopted before it (the square pictures'
    code is used only once the code for any shape is). Each adopted part's seconds go to `report`;
    `on_adopted` is called after each part (with the lock still held), `on_finished` once all are.
    """

    def __init__(self, parts: Sequence[str], adopt: Callable[[str], None], lock: threading.RLock,
                 report: StartReport, *, after: Callable[[str], str | None] = lambda part: None,
                 on_adopted: Callable[[], object] = lambda: None,
                 on_finished: Callable[[], object] = lambda: None) -> None:
        self.parts = list(parts)
        self.helpers = Helpers({}, [])  # none until `start`
        self._adopt, self._lock, self._report, self._after = adopt, lock, report, after
        self._on_adopted, self._on_finished = on_adopted, on_finished
        self._adopted: set[str] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._ended = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="background-compile", daemon=True)

    def start(self, helpers: Helpers) -> None:
        """Adopt the parts as `helpers` (started with `heard_end` as their `on_end`) finish them, and
        compile those they do not take."""
        self.helpers = helpers
        self._started = time.monotonic()
        self._thread.start()

    def heard_end(self, part: str) -> None:
        """A helper has ended `part` (Helpers' `on_end`): note it and wake the thread."""
        if self.helpers.compiled(part):
            self._report.add(helper_compiled(part), time.monotonic() - self._started)
        with self._changed:
            self._changed.notify_all()

    def adopted(self, part: str) -> bool:
        """Whether the worker runs `part`'s compiled code now."""
        with self._changed:
            return part in self._adopted

    def compiled(self, part: str) -> bool:
        """Whether `part`'s compiled code is in the cache, ready to be read back: adopted, or compiled
        by its helper."""
        return self.adopted(part) or self.helpers.compiled(part)

    @property
    def finished(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every part is adopted and `on_finished` has run, or the compiling was stopped
        (after the part under way); False on `timeout`."""
        return self._ended.wait(timeout)

    def stop(self) -> None:
        """Adopt nothing more (a part under way is finished) and end the helpers."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self.helpers.close()

    def _eligible(self, part: str, *, unhelped: bool) -> bool:
        before = self._after(part)
        if part in self._adopted or (before is not None and before in self.parts and before not in self._adopted):
            return False
        return self.helpers.ended(part) if self.helpers.owns(part) else unhelped

    def _next(self) -> str | None:
        """Under the condition: the part to adopt now, if any. Parts a helper has finished go first;
        one no helper has is compiled here only when no helper's part is pending, since that takes
        minutes during which a helper's part could have been adopted in seconds."""
        ended = [part for part in self.parts if self._eligible(part, unhelped=False)]
        if ended:
            return ended[0]
        pending = any(self.helpers.owns(p) and not self.helpers.ended(p) for p in self.parts)
        unhelped = [part for part in self.parts if self._eligible(part, unhelped=True)]
        return unhelped[0] if unhelped and not pending else None

    def _run(self) -> None:
        try:
            self._adopt_all()
        finally:
            self._ended.set()

    def _adopt_all(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or self._next() is not None
                                       or len(self._adopted) == len(self.parts))
                part = None if self._stopping else self._next()
            if part is None:
                break
            self._adopt_one(part)
        self.helpers.close()
        if not self._stopping:
            self._on_finished()
        log.info("compiled code in use for %s", ", ".join(sorted(self._adopted)) or "nothing")

    def _adopt_one(self, part: str) -> None:
        if self.helpers.owns(part) and not self.helpers.compiled(part):
            log.warning("a start helper did not compile %s (its log says why); compiling it here", part)
        with self._lock:
            started = time.monotonic()
            try:
                self._adopt(part)
            except Exception:  # noqa: BLE001 - the worker goes on uncompiled for this part
                log.exception("could not compile %s; it runs uncompiled", part)
            else:
                self._report.add(part, time.monotonic() - started)
            self._on_adopted()
        with self._changed:
            self._adopted.add(part)
            self._changed.notify_all()
