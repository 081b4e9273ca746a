"""Turns stored jobs into work for the runner and the runner's events back into stored state.

The database is the system of record: a job is a row before anything runs, progress and
checkpoints are written as they arrive, and results become files and rows before the person is
told. The scheduler never touches Discord; it reports to a `JobObserver` (the bot's progress
messages), which keeps the rules here testable without a Discord connection.

Rules: generation before training (claim order in storage, with aging: a training waits a bounded
time however many pictures are asked for, and round-robin by person within each), one training queued
or running per person, at most `max_queued_generations` waiting generations per person, and the
quotas of bot.quotas (checked and counted together, when a job is queued). A job whose worker died
is re-queued once and resumes from its last checkpoint; a second loss fails it with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from bot import quotas
from bot.apology import sorry
from bot.config import Settings
from jobs.events import (
    FINAL,
    Checkpoint,
    Done,
    Error,
    Event,
    Preview,
    Progress,
    Requeued,
    Stage,
    WorkerLost,
    WorkerStopped,
)
from jobs.payloads import (
    GenerateInputs,
    GenerateOutput,
    GenerateParams,
    TrainInputs,
    TrainOutput,
    TrainParams,
    VariationOf,
    WorkItem,
    from_stored,
    to_stored,
)
from jobs.requests import BadRequest, GenerateRequest, check_train_steps
from jobs.runner import JobRunner
from storage import generations_db, jobs_db, limits_db, models_db, photos_db, retention, usage_db, users_db
from storage.forget import forget_user
from storage.jobs_db import Job
from storage.models_db import Model
from storage.store import Storage
from storage.users_db import User

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a worker lost twice on one job: that job is probably what kills it
MAX_RESTARTS = 5  # a job interrupted by this many bot restarts is failed instead of re-queued
LEASE_SECONDS = 600.0
PROGRESS_WRITE_INTERVAL_S = 1.0
SUBMIT_RETRY_S = 0.5  # after a failed hand-over, time for the runner to replace the worker
DISPATCH_POLL_S = 2.0  # how often the loop also looks for capacity that appeared on its own


class Refused(Exception):
    """A request the rules do not allow; `message` says why and what to do instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def refuse_bad(check: Callable[..., object], *args: Any) -> None:
    """Run a request's check; what it refuses is refused here, with its message."""
    try:
        check(*args)
    except BadRequest as exc:
        raise Refused(exc.message) from exc


class JobObserver(Protocol):
    """What the front end is told about jobs. Each call gets the job as stored after the change."""

    async def job_updated(self, job: Job, event: Event) -> None: ...

    async def job_finished(self, job: Job, outcome: dict[str, Any]) -> None: ...


def adapter_key(model_id: int) -> str:
    """The name under which a worker keeps a model's LoRA loaded."""
    return f"model-{model_id}"


class Scheduler:
    """Feeds queued jobs to idle workers and records what comes back."""

    def __init__(self, store: Storage, runner: JobRunner, settings: Settings, observer: JobObserver,
                 worker_id: str = "local", *, clock: Callable[[], float] = time.time) -> None:
        """`clock`: the time the claim order's aging and the quotas are measured with (tests pass a
        fake one, or set the attribute)."""
        self.store = store
        self.clock = clock
        self.runner = runner
        self.settings = settings
        self.observer = observer
        self.worker_id = worker_id
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_progress_write: dict[int, float] = {}
        self._user_locks: dict[int, asyncio.Lock] = {}
        # One admission at a time: the server totals and MAX_QUEUED_JOBS are shared by many people,
        # so their check and the job that counts against them must not interleave with another's.
        self._admission = asyncio.Lock()

    def user_lock(self, user_id: int) -> asyncio.Lock:
        """One person's changes, one at a time: a check and the write it allows (one training, a
        queue limit) happen together, and `forget` waits for a photo being stored rather than leave
        its file behind. Held by the photo intake too (bot.cogs.selfies)."""
        return self._user_locks.setdefault(user_id, asyncio.Lock())

    def waiting_for_a_worker(self) -> bool:
        """No worker is online: queued jobs wait for one to join, which the people waiting should know."""
        return self.runner.workers_online() == 0

    # ----- life cycle -------------------------------------------------------------------------
    async def start(self) -> list[int]:
        """Re-queue jobs that were running when the bot stopped, start workers and the loop."""
        running = await jobs_db.jobs_in_states(self.store.db, ("running",))
        requeued = await jobs_db.requeue_interrupted(self.store.db, all_running=True)
        if requeued:
            log.info("re-queued %d interrupted job(s): %s", len(requeued), requeued)
        for job in running:  # those it cancelled (their owners had asked) are told so, as at any cancel
            if job.id not in requeued and (ended := await jobs_db.get_job(self.store.db, job.id)) is not None:
                await self._finished(ended, {})
        for job_id in requeued:
            again = await jobs_db.get_job(self.store.db, job_id)
            if again is not None and again.restarts >= MAX_RESTARTS:
                await self._fail(again, "This job was interrupted too many times; please start it again.")
                await self.runner.cancel(job_id)  # its last attempt may still run on a remote worker
        await self.runner.start(self._on_event)
        self._task = asyncio.create_task(self._dispatch_loop(), name="scheduler")
        self._wake.set()
        return requeued

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.runner.stop()

    def wake(self) -> None:
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            # Woken by new and finished jobs; the timeout notices capacity that appears on its own (a
            # remote worker joining). asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow a cancellation that arrives as the event is set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISPATCH_POLL_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception:
                log.exception("dispatching jobs failed; retrying on the next wake-up")
                await asyncio.sleep(1)
                self._wake.set()

    async def _dispatch(self) -> None:
        while kinds := [k for k in ("generate", "train") if self.runner.idle_capacity(k) > 0]:
            job = await jobs_db.claim_next_job(self.store.db, self.worker_id, LEASE_SECONDS, kinds=kinds,
                                               now=self.clock())
            if job is None:
                return
            try:
                item = await self._work_item(job)
            except Refused as exc:  # e.g. the photos or the model vanished after queueing
                await self._fail(job, exc.message)
                continue
            except Exception:  # e.g. a stored file that cannot be read: the job ends, it does not hang
                await self._fail(job, self._internal_error(f"preparing job {job.id}"))
                continue
            # Shown before the hand-over: the worker's first events may arrive before `submit` returns,
            # and a later update would put this older state back over them.
            handing_over = {"stage": "loading_model", "detail": ""}
            await jobs_db.update_progress(self.store.db, job.id, handing_over)
            await self.observer.job_updated(jobs_db.with_progress(job, handing_over), Stage("loading_model"))
            try:
                await self.runner.submit(item)
            except (OSError, RuntimeError):  # the worker died as the job was handed over
                log.warning("could not hand job %d to a worker; it waits for the next one", job.id)
                await jobs_db.update_progress(self.store.db, job.id, job.progress)
                await jobs_db.requeue(self.store.db, job.id, refund_attempt=True)
                asyncio.get_running_loop().call_later(SUBMIT_RETRY_S, self._wake.set)
                return
            except Exception:
                await self._fail(job, self._internal_error(f"handing job {job.id} to a worker"))
                continue
            # A cancel (or /forget) that came between the claim and now found no worker holding the
            # job to tell; tell it now, or the job would run to its end.
            current = await jobs_db.get_job(self.store.db, job.id)
            if current is None or current.cancel_requested:
                await self.runner.cancel(job.id)
            if current is None and item.adapter_key:
                # Forgotten meanwhile: /forget's eviction went out before this hand-over brought the
                # person's LoRA to a worker again.
                await self.runner.forget_adapter(item.adapter_key)

    @staticmethod
    def _internal_error(doing: str) -> str:
        """Log the exception being handled under a reference, and say so kindly to the job's owner."""
        return sorry(log, doing, "Please try again; if it keeps happening, tell the server's operator.")

    async def _work_item(self, job: Job) -> WorkItem:
        params = from_stored(job.kind, job.params)
        if isinstance(params, TrainParams):
            photos = await photos_db.list_photos(self.store.db, job.owner)
            data = [self.store.files.read(p.path, job.owner) for p in photos]
            if len(data) < self.settings.min_photos:
                raise Refused("Some photos were removed after this training was queued; "
                              f"please send at least {self.settings.min_photos} and train again.")
            checkpoint = self.store.files.read(job.checkpoint_path, job.owner) if job.checkpoint_path else None
            return WorkItem(job.id, params, TrainInputs(data, checkpoint))
        lora = init_image = None
        if params.model_id is not None:
            model = await models_db.get_model(self.store.db, params.model_id)
            if model is None or model.owner != job.owner:
                raise Refused("That model no longer exists; train a new one with /train.")
            lora = self.store.files.read(model.lora_path, job.owner)
        if (parent := params.upscale_of or params.variation_of) is not None:
            generation = await generations_db.get_generation(self.store.db, parent.generation_id)
            if generation is None or generation.owner != job.owner or parent.index >= len(generation.paths):
                # forgotten, or past PICTURE_RETENTION_DAYS
                raise Refused(f"The image to {'upscale' if params.upscale_of else 'vary'} no longer exists.")
            init_image = self.store.files.read(generation.paths[parent.index], job.owner)
        return WorkItem(job.id, params, GenerateInputs(lora, init_image))

    # ----- requests from people -----------------------------------------------------------------
    async def enqueue_train(self, user_id: int, steps: int | None = None, *, channel_id: int | None = None,
                            message_id: int | None = None, guild_id: int | None = None) -> tuple[Job, int | None]:
        """Queue a training after checking handle, photos, that none is already queued or running,
        and the quotas (`guild_id`: the server it was asked in, whose limits and totals apply)."""
        async with self.user_lock(user_id):
            job_id = await self._create_training(user_id, steps, channel_id, message_id, guild_id)
        self.wake()
        return await self._with_position(job_id)

    async def _create_training(self, user_id: int, steps: int | None, channel_id: int | None,
                               message_id: int | None, guild_id: int | None) -> int:
        user = await users_db.get_user(self.store.db, user_id)
        if user is None or not user.handle or not user.class_word:  # /handle sets both
            raise Refused("Pick your handle first with `/handle`, e.g. `/handle name:zqjane class:woman`.")
        count = await photos_db.count_photos(self.store.db, user_id)
        if count < self.settings.min_photos:
            raise Refused(f"You have {count} photo(s); send me at least {self.settings.min_photos} "
                          "selfies in this DM first.")
        active = await jobs_db.count_jobs(self.store.db, user_id, "train", ("queued", "running"))
        if active:
            raise Refused("Your model is already training or waiting to train. `/status` shows where it is, "
                          "`/cancel` stops it.")
        if steps is not None:
            refuse_bad(check_train_steps, steps)
        params = TrainParams(user.handle, user.class_word, self.settings.train_config(steps))
        async with self._admission:
            now = self.clock()
            limits = await limits_db.limits_for(self.store.db, self.settings.default_limits, guild_id)
            if why := await quotas.training_refusal(self.store.db, limits, user_id, guild_id, now):
                raise Refused(why)
            return await self._admit("train", user_id, to_stored(params), channel_id, message_id, guild_id, now)

    async def _admit(self, kind: str, user_id: int, params: dict[str, Any], channel_id: int | None,
                     message_id: int | None, guild_id: int | None, now: float) -> int:
        """Queue a job the person's rules allow, if the queue has room, and count it against their quota."""
        if why := await quotas.queue_refusal(self.store.db, self.settings.max_queued_jobs):
            raise Refused(why)
        job_id = await jobs_db.create_job(self.store.db, kind, user_id, params, channel_id=channel_id,
                                          message_id=message_id, guild_id=guild_id, now=now)
        job = await jobs_db.get_job(self.store.db, job_id)
        assert job is not None
        await quotas.record(self.store.db, job)
        return job_id

    async def enqueue_generate(self, user_id: int, request: GenerateRequest, *,
                               variation_of: VariationOf | None = None, channel_id: int | None = None,
                               message_id: int | None = None, allow_flagged: bool = False,
                               guild_id: int | None = None,
                               upscale_of: VariationOf | None = None) -> tuple[Job, int | None]:
        """Queue an /imagine request with the person's own active model, once it passes the checks a
        worker would make (GenerateRequest's own) and the operator's limits. `allow_flagged`: where it
        was asked, the pictures the image checker flags may be shown (bot.safety). `guild_id`: the
        server it was asked in, whose limits and totals apply. `upscale_of`: the job upscales that
        picture (one picture, counted as one)."""
        async with self.user_lock(user_id):
            job_id = await self._create_generation(user_id, request, variation_of, channel_id, message_id,
                                                   allow_flagged, guild_id, upscale_of)
        self.wake()
        return await self._with_position(job_id)

    async def check_generate(self, user_id: int, request: GenerateRequest, guild_id: int | None = None) -> None:
        """Raise Refused if the request would be refused now, writing nothing: a command checks this
        before its public "thinking…", so that a refusal is only ever seen by the person who asked.
        `enqueue_generate` checks again, under the locks, when it queues."""
        await self._generation_model(user_id, request)
        await self._pictures_admissible(user_id, request, guild_id, self.clock())
        if why := await quotas.queue_refusal(self.store.db, self.settings.max_queued_jobs):
            raise Refused(why)

    async def _generation_model(self, user_id: int, request: GenerateRequest) -> tuple[User, Model]:
        """The person and the model a request of theirs would use, after the checks that need no quota."""
        user = await users_db.get_user(self.store.db, user_id)
        model = await models_db.get_active_model(self.store.db, user_id)
        if model is None or user is None:
            if await jobs_db.count_jobs(self.store.db, user_id, "train", ("queued", "running")):
                raise Refused("Your model is still being trained; `/status` shows how far it is. "
                              "Try `/imagine` again once it is ready.")
            raise Refused("You don't have a model yet. Send me your selfies in a DM, then run `/train`.")
        refuse_bad(request.check_length, self.settings.max_prompt_chars)
        waiting = await jobs_db.count_jobs(self.store.db, user_id, "generate", ("queued",))
        if waiting >= self.settings.max_queued_generations:
            raise Refused(f"You already have {waiting} pictures waiting; please let them finish first.")
        return user, model

    async def _pictures_admissible(self, user_id: int, request: GenerateRequest, guild_id: int | None,
                                   now: float) -> None:
        limits = await limits_db.limits_for(self.store.db, self.settings.default_limits, guild_id)
        if why := await quotas.pictures_refusal(self.store.db, limits, user_id, guild_id, request.num_images, now):
            raise Refused(why)

    async def _create_generation(self, user_id: int, request: GenerateRequest, variation_of: VariationOf | None,
                                 channel_id: int | None, message_id: int | None, allow_flagged: bool,
                                 guild_id: int | None, upscale_of: VariationOf | None = None) -> int:
        user, model = await self._generation_model(user_id, request)
        handle = model.metadata.get("handle", user.handle)
        class_word = model.metadata.get("class_word", user.class_word)
        params = GenerateParams(request, model.id, adapter_key(model.id), handle, class_word, variation_of,
                                upscale_of=upscale_of, allow_flagged=allow_flagged)
        async with self._admission:
            now = self.clock()
            await self._pictures_admissible(user_id, request, guild_id, now)
            return await self._admit("generate", user_id, to_stored(params), channel_id, message_id, guild_id, now)

    async def _with_position(self, job_id: int) -> tuple[Job, int | None]:
        job = await jobs_db.get_job(self.store.db, job_id)
        assert job is not None
        return job, await jobs_db.queue_position(self.store.db, job_id, now=self.clock())

    async def cancel_user_jobs(self, user_id: int, kind: str | None = None,
                               reason: str | None = None) -> list[Job]:
        """Cancel the person's queued and running jobs; running ones stop at their next step.
        `reason`: what their owner is told, if not the owner's own cancel (`jobs_db.request_cancel`)."""
        cancelled = []
        for job in await jobs_db.jobs_for_user(self.store.db, user_id, states=("queued", "running")):
            if kind and job.kind != kind:
                continue
            await self._cancel(job, reason)
            cancelled.append(job)
        return cancelled

    async def cancel_job(self, job_id: int, reason: str | None = None) -> Job | None:
        """Cancel one job of anyone's (an operator's /admin cancel); None if it is not queued or running."""
        job = await jobs_db.get_job(self.store.db, job_id)
        if job is None or job.state not in ("queued", "running"):
            return None
        await self._cancel(job, reason)
        return job

    async def _cancel(self, job: Job, reason: str | None) -> None:
        state = await jobs_db.request_cancel(self.store.db, job.id, reason)
        if state == "running":
            await self.runner.cancel(job.id)  # its worker reports `cancelled` at the next step
        elif state == "cancelled":  # it was queued: tell the person now
            # An attempt from before a restart may still be out there (a worker running it, or its
            # message waiting in a queue): the runner is told too, so none of it runs on.
            await self.runner.cancel(job.id)
            await self._finished(job, {})

    async def forget(self, user_id: int) -> dict[str, int]:
        """Stop the person's jobs, drop their LoRAs from the workers, then delete all their data
        (after any photo being stored or job being queued for them right now)."""
        async with self.user_lock(user_id):
            await self.cancel_user_jobs(user_id)
            await self.runner.forget_jobs([job.id for job in await jobs_db.jobs_for_user(self.store.db, user_id)])
            for model in await models_db.list_models(self.store.db, user_id):
                await self.runner.forget_adapter(adapter_key(model.id))
            return await forget_user(self.store, user_id)

    # ----- events from workers -----------------------------------------------------------------
    async def _on_event(self, job_id: int, event: Event) -> None:
        try:
            await self._handle_event(job_id, event)
        except Exception:
            log.exception("handling a %s event of job %d failed", event.type, job_id)
        if isinstance(event, FINAL):
            self.wake()

    async def _handle_event(self, job_id: int, event: Event) -> None:
        job = await jobs_db.get_job(self.store.db, job_id)
        if job is None or job.state != "running":
            return  # forgotten or already finished: drop late events (and their bytes)
        if isinstance(event, Stage | Progress):
            progress: dict[str, Any] = (
                {"stage": event.stage, "detail": event.detail} if isinstance(event, Stage) else {
                    **job.progress, "stage": event.stage, "step": event.step, "total": event.total,
                    "loss": event.loss, "eta_s": event.eta_s})
            now = time.monotonic()
            if isinstance(event, Stage) or now - self._last_progress_write.get(job_id, 0.0) >= PROGRESS_WRITE_INTERVAL_S:
                self._last_progress_write[job_id] = now
                await jobs_db.update_progress(self.store.db, job_id, progress)
                await jobs_db.renew_lease(self.store.db, job_id, self.worker_id, LEASE_SECONDS)
            await self.observer.job_updated(jobs_db.with_progress(job, progress), event)
        elif isinstance(event, Preview):
            await self.observer.job_updated(job, event)
        elif isinstance(event, Checkpoint):
            await self._store_checkpoint(job, event)
        elif isinstance(event, Done) and job.cancel_requested:  # it ended before it heard of the cancel
            await jobs_db.finish_job(self.store.db, job_id, "cancelled",
                                     error=job.error or "The job was cancelled.")
            await self._finished(job, {})
        elif isinstance(event, Done):
            outcome = await self._store_result(job, event.result)
            self._last_progress_write.pop(job_id, None)
            finished = await jobs_db.get_job(self.store.db, job_id)
            await self.observer.job_finished(finished or job, outcome)
        elif isinstance(event, Error):
            if event.code == "cancelled":
                await jobs_db.finish_job(self.store.db, job_id, "cancelled", error=job.error or event.message)
                await self._finished(job, {})
            else:
                await self._fail(job, event.message)
        elif isinstance(event, WorkerStopped):  # a worker's own shutdown: sent again, no attempt spent
            if job.cancel_requested:
                await jobs_db.finish_job(self.store.db, job_id, "cancelled",
                                         error=job.error or "The job was cancelled.")
                await self._finished(job, {})
                return
            await jobs_db.requeue(self.store.db, job_id, refund_attempt=True)
            log.info("job %d: its worker stopped; re-queued from its last checkpoint", job_id)
            requeued = await jobs_db.get_job(self.store.db, job_id)
            await self.observer.job_updated(requeued or job, Requeued("worker_stopped"))
        elif isinstance(event, WorkerLost):
            if job.attempts < MAX_ATTEMPTS and not job.cancel_requested:
                await jobs_db.requeue(self.store.db, job_id)
                log.warning("job %d lost its worker; re-queued (attempt %d)", job_id, job.attempts)
                requeued = await jobs_db.get_job(self.store.db, job_id)
                await self.observer.job_updated(requeued or job, Requeued("worker_lost"))
            else:
                await self._fail(job, f"{event.message} It happened {job.attempts} times, so I stopped "
                                      "trying. The operator can see the details in the logs.")

    async def _fail(self, job: Job, message: str) -> None:
        await jobs_db.finish_job(self.store.db, job.id, "failed", error=message)
        await self._finished(job, {})

    async def _finished(self, job: Job, outcome: dict[str, Any]) -> None:
        """Tell the owner that a job which made no model has ended, and remove its checkpoint: a
        failed or cancelled training is not resumed (a new /train starts afresh)."""
        finished = await jobs_db.get_job(self.store.db, job.id) or job
        if finished.checkpoint_path:
            self.store.files.delete(finished.checkpoint_path, finished.owner)
        await quotas.settle(self.store.db, finished)
        await self.observer.job_finished(finished, outcome)

    async def _store_checkpoint(self, job: Job, event: Checkpoint) -> None:
        path = self.store.files.write(job.owner, "checkpoints", event.data, ".zip")
        old = job.checkpoint_path
        await jobs_db.set_checkpoint(self.store.db, job.id, path)
        if old:
            self.store.files.delete(old, job.owner)
        log.info("job %d checkpointed at step %d", job.id, event.step)

    async def _store_result(self, job: Job, result: TrainOutput | GenerateOutput) -> dict[str, Any]:
        if isinstance(result, TrainOutput):
            lora_path = self.store.files.write(job.owner, "models", result.lora, ".safetensors")
            metadata = dict(result.metadata)
            if result.kohya:
                metadata["kohya_path"] = self.store.files.write(job.owner, "models", result.kohya, ".safetensors")
            model_id, dropped = await retention.save_model(self.store, job.owner, job.id, lora_path,
                                                           metadata.get("base_model", self.settings.base_model),
                                                           metadata)
            for old in dropped:  # older than the previous model: gone from the disk, and from the workers
                await self.runner.forget_adapter(adapter_key(old))
            await jobs_db.finish_job(self.store.db, job.id, "succeeded",
                                     result={"model_id": model_id, "steps": result.steps,
                                             "final_loss": result.final_loss})
            if job.checkpoint_path:
                self.store.files.delete(job.checkpoint_path, job.owner)
            return {"model_id": model_id, "samples": result.samples, "hints": result.hints}
        params = from_stored("generate", job.params)
        assert isinstance(params, GenerateParams)
        # A picture the image checker flagged is neither stored nor sent where the filter applies; the
        # generation keeps only the others, so its buttons number what the person sees.
        images = [im for im in result.images if params.allow_flagged or not im.flagged]
        if withheld := len(result.images) - len(images):
            await usage_db.record_usage(self.store.db, job.owner, job.guild_id, "flagged", withheld)
            log.info("job %d: the image checker flagged %d picture(s); withheld", job.id, withheld)
        paths = [self.store.files.write(job.owner, "generations", im.png, ".png") for im in images]
        generation_id = await generations_db.add_generation(
            self.store.db, job.owner, params.model_id, job.id, params.request.prompt,
            params.request.negative_prompt, [im.seed for im in images], job.params, paths,
            channel_id=job.channel_id, message_id=job.message_id)
        await jobs_db.finish_job(self.store.db, job.id, "succeeded", result={"generation_id": generation_id})
        return {"generation_id": generation_id, "images": images, "withheld": withheld}

