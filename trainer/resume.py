"""A training's checkpoints: what one holds of it, and continuing from one exactly.

A checkpoint (trainer.checkpoint's file) carries the fp32 LoRA parameters, the optimiser's and the
loss scaler's state, the step generator's state, the steps done with their losses, and the settings.
A training continues from one only under the settings that shape what it computes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainer.errors import BadCheckpoint
from trainer.trainable import Trainable
from trainer.training_loop import TrainingProgress

log = logging.getLogger(__name__)

# Fields that must match between a checkpoint and the run resuming from it; the others (steps,
# checkpoint and preview intervals) may change, so a finished training can be extended.
RESUME_FIELDS = ("learning_rate", "rank", "alpha", "train_text_encoder", "text_encoder_lr",
                 "prior_preservation", "prior_loss_weight", "num_class_images", "resolution", "batch_size",
                 "snr_gamma", "noise_offset", "seed", "lora_targets", "adam_weight_decay", "max_grad_norm")


def load_resumable(path: Path, settings: dict[str, Any]) -> TrainState:
    """The checkpoint at `path`, if it was written under these `settings` (the config's fields and
    the base model); raises BadCheckpoint otherwise."""
    state = load_checkpoint(Path(path))
    # Checkpoints from before the base model was recorded have none: those are taken as they were.
    fields = RESUME_FIELDS + (("base_model",) if "base_model" in state.config else ())
    different = [k for k in fields if state.config.get(k) != settings.get(k)]
    if different:
        raise BadCheckpoint("The checkpoint was made with different settings "
                            f"({', '.join(different)}), so the training cannot continue from it.")
    return state


def write_checkpoint(path: Path, progress: TrainingProgress, trainable: Trainable, generator: torch.Generator,
                     settings: dict[str, Any]) -> None:
    save_checkpoint(path, TrainState(
        step=progress.step, params={k: p.detach() for k, p in trainable.params.items()},
        optimizer=trainable.optimizer.state_dict(), rng=generator.get_state(), losses=list(progress.losses),
        config=settings, scaler=trainable.scaler.state_dict() if trainable.scaler else None))


def restore(state: TrainState, trainable: Trainable, generator: torch.Generator) -> TrainingProgress:
    """Put the checkpoint's parameters, optimiser and generator state in place; returns where it stood."""
    params = trainable.params
    missing = set(params) ^ set(state.params)
    if missing or any(param.shape != state.params[key].shape for key, param in params.items()):
        raise BadCheckpoint("The checkpoint does not match this model's LoRA layers, so the training "
                            "cannot continue from it.")
    try:
        generator.set_state(state.rng)
    except (RuntimeError, ValueError) as exc:  # a CPU generator's state on a GPU, or the reverse
        raise BadCheckpoint("The checkpoint was made on another kind of device, so the training cannot "
                            "continue from it.") from exc
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state.params[key])
    trainable.copy_masters_to_lora()
    trainable.optimizer.load_state_dict(state.optimizer)
    if trainable.scaler is not None and state.scaler:
        trainable.scaler.load_state_dict(state.scaler)
    log.info("resuming training at step %d", state.step)
    return TrainingProgress(state.step, list(state.losses))
