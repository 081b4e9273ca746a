"""The steps of a training run one after another, with progress reports, checkpoints and previews.

Losses stay on the device until a report is due (at most one a second, and at each checkpoint and
the last step): reading one back waits for the GPU, which the steps in between need not do.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline

from jobs import events
from jobs.events import EventSink
from trainer.errors import Cancelled

if TYPE_CHECKING:
    from jobs.requests import TrainConfig

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0


@dataclass
class TrainingProgress:
    """Where a training stands: the steps done, and the loss of every step read back so far."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


def run_steps(progress: TrainingProgress, config: TrainConfig, train_step: Callable[[], torch.Tensor], *,
              capture_s: Callable[[], float | None], checkpoint: Callable[[], None],
              preview: Callable[[], None], serve_riders: Callable[[], None],
              should_cancel: Callable[[], bool], on_event: EventSink, clock: Callable[[], float]) -> None:
    """Step until `config.steps` are done, reporting progress, calling `checkpoint` and `preview` when
    due and `serve_riders` before each step and after the last; raises Cancelled when asked to stop.

    `train_step` advances `progress.step` and returns its loss on the device. `capture_s` is the time
    the steps so far spent capturing (and compiling) the step, which the estimate of time left leaves out.
    """
    total = config.steps
    pending: list[torch.Tensor] = []  # losses not yet read back from the device
    started, start_step = clock(), progress.step
    last_report = 0.0
    while progress.step < total:
        if should_cancel():
            raise Cancelled()
        serve_riders()
        pending.append(train_step())
        now = clock()
        step = progress.step
        # The last step too: a job stopped while saving or drawing its sample pictures then
        # resumes with nothing left to train.
        checkpoint_due = config.checkpoint_every and (step % config.checkpoint_every == 0 or step == total)
        if now - last_report >= REPORT_EVERY_S or step == total or checkpoint_due:
            progress.losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            # The first step's graph capture (and compiling) says nothing about the steps to come.
            per_step = (now - started - (capture_s() or 0.0)) / (step - start_step)
            recent = progress.losses[-10:]
            on_event(events.Progress(step, total, loss=sum(recent) / len(recent),
                                     eta_s=per_step * (total - step)))
            last_report = now
        if checkpoint_due:
            checkpoint()
        if config.preview_every and step % config.preview_every == 0:
            preview()
    progress.losses += torch.stack(pending).float().cpu().tolist() if pending else []
    serve_riders()  # before the save


@torch.no_grad()
def send_preview(step: int, render: Callable[[], bytes], device: torch.device, on_event: EventSink) -> None:
    """Send the picture `render` draws. A preview is a courtesy: one that fails (out of memory on a
    small card, say) is skipped, and the training goes on."""
    try:
        image = render()
    except Cancelled:
        raise
    except Exception:
        log.warning("the preview at step %d failed; the training goes on without it", step, exc_info=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    on_event(events.Preview(step, image))


def render_preview(pipe: DiffusionPipeline, prompt: str, config: TrainConfig, device: torch.device,
                   serve_riders: Callable[[], None]) -> bytes:
    """A small picture of `prompt` drawn with the adapter as trained so far, as PNG; the same seed at
    every step, so the previews show how the likeness develops."""
    size = min(config.preview_resolution, config.resolution)
    gen_device = "cpu" if device.type == "mps" else device

    def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
        serve_riders()  # between denoising steps: a request waits for one of them, not a whole preview
        return tensors

    image = pipe(prompt=prompt, height=size, width=size, num_inference_steps=config.preview_steps,
                 callback_on_step_end=on_step_end,
                 generator=torch.Generator(gen_device).manual_seed(config.seed)).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
