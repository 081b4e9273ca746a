"""A process of its own that compiles a small function with inductor on the CPU, for the tests of
trainer.compile_artifacts: `save <folder>` keeps what it compiled there, `load <folder>...` loads the
first good blob of those folders before compiling. It prints the inductor cache's counters as JSON.

    python -m tests.trainer.artifact_process save|load <folder>...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.work_items import JOB_SECRET
from trainer import compile_artifacts

KEY = {"device": "cpu", "model": "a small function"}


def small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ w).sum(-1)


def main(mode: str, folders: list[str]) -> None:
    stores: list[compile_artifacts.Store] = [compile_artifacts.FolderStore(Path(f)) for f in folders]
    secret = JOB_SECRET.encode()
    loaded = compile_artifacts.load(stores, KEY, secret) if mode == "load" else None
    torch.compile(small)(torch.randn(8, 16), torch.randn(16, 16))
    if mode == "save":
        compile_artifacts.save(stores, KEY, secret)
    from torch._dynamo.utils import counters

    sys.stdout.write(json.dumps({"counters": dict(counters["inductor"]),
                      "loaded_from": None if loaded is None else str(getattr(loaded, "folder", ""))}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
