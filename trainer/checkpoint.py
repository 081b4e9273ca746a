"""Resumable training checkpoints as one safetensors file (tensors) with JSON in its header (the rest).

One file travels easily between a worker and the bot, and safetensors never runs pickled code, so a
checkpoint handed back by another process is safe to open. It holds everything that makes a resumed
run continue exactly as an uninterrupted one would: the LoRA weights, the optimiser's moments and
step counts, the random generator's state, the loss history and the configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trainer.errors import BadCheckpoint
from trainer.file_writes import write_atomic

FORMAT = "avatar-lora-checkpoint"
VERSION = "1"


@dataclass
class TrainState:
    step: int
    params: dict[str, torch.Tensor]  # trainable LoRA tensors by parameter name
    optimizer: dict[str, Any]  # torch optimiser state_dict
    rng: torch.Tensor  # torch.Generator.get_state()
    losses: list[float]
    config: dict[str, Any]
    scaler: dict[str, Any] | None = None  # GradScaler state (fp16 training only)


def save_checkpoint(path: Path, state: TrainState) -> Path:
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu().contiguous()
                                        for k, v in state.params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state.optimizer["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng"] = state.rng.cpu().contiguous()
    header = {
        "format": FORMAT, "version": VERSION, "step": str(state.step),
        "losses": json.dumps(state.losses), "config": json.dumps(state.config),
        "param_groups": json.dumps(state.optimizer["param_groups"]),
        "optim_scalars": json.dumps(scalars), "scaler": json.dumps(state.scaler),
    }
    return write_atomic(path, lambda p: save_file(tensors, p, metadata=header), "training checkpoint")


def load_checkpoint(path: Path) -> TrainState:
    """Read a checkpoint written by `save_checkpoint`; anything else raises BadCheckpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise BadCheckpoint("This file is not a training checkpoint of this trainer.")
            if header.get("version") != VERSION:
                raise BadCheckpoint(f"This checkpoint has format version {header.get('version')}; "
                                    f"this trainer reads version {VERSION}. Start the training again.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (OSError, SafetensorError) as exc:
        raise BadCheckpoint(f"The checkpoint {path.name} could not be read: {exc}") from exc
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in json.loads(header["optim_scalars"]).items():
        state.setdefault(int(index), {}).update(entry)
    groups = json.loads(header["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return TrainState(
        step=int(header["step"]), params=params, optimizer={"state": state, "param_groups": groups},
        rng=tensors["rng"], losses=json.loads(header["losses"]), config=json.loads(header["config"]),
        scaler=json.loads(header["scaler"]),
    )
