"""A torch.compile backend standing in for inductor and its on-disk cache, for the tests of a worker
that compiles in the background (trainer.background_compile).

Like inductor, it keeps what it compiled in `TORCHINDUCTOR_CACHE_DIR` (a marker file per graph, keyed
by the graph's code and its inputs' shapes and dtypes), and a graph found there is read back at once.
A graph not found there is "compiled": that waits until the file named by `GATE_ENV` exists, so a
test decides when compiling ends, without timing anything. The graph then runs as traced (eager), so
compiled and uncompiled results are equal bit for bit. `COMPILED` and `READ` list this process's keys.

Named to workers as "tests.trainer.gated_backend:backend" (WorkerConfig.compile_backend).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GATE_ENV = "STAND_IN_COMPILE_GATE"
COMPILED: list[str] = []
READ: list[str] = []
GATE_POLL_S = 0.05


def graph_key(gm: torch.fx.GraphModule) -> str:
    values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
    shapes = "|".join(f"{getattr(v, 'shape', v)} {getattr(v, 'dtype', '')}" for v in values)
    return hashlib.sha256(f"{gm.code}\n{shapes}".encode()).hexdigest()


def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    del example_inputs
    key = graph_key(gm)
    marker = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "stand-in" / key
    if marker.exists():
        READ.append(key)
        return gm.forward
    gate = os.environ.get(GATE_ENV)
    while gate and not Path(gate).exists():
        time.sleep(GATE_POLL_S)  # a compile that lasts as long as the test wants
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    COMPILED.append(key)
    return gm.forward
