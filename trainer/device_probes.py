"""Answers about this machine's devices, asked by `jobs.devices` in a child process that may import torch."""

from __future__ import annotations

import torch


def count_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_mps() -> bool:
    return torch.backends.mps.is_available()
