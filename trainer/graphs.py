"""CUDA graphs for inference: a module's call captured once per input shape, then replayed.

A 512 px denoising step of SD1.5 is about a thousand kernels. Launched one by one from Python the CPU
is the bottleneck (the GPU idles most of a step); replaying a captured graph launches them all at
once. `GraphedCall` wraps a function of tensors (the UNet's forward, the VAE's decode): the first call
with a new combination of input shapes, dtypes and options captures a graph, later calls copy their
inputs into the graph's static input tensors and replay it.

What a replay assumes, and how it is kept true:
- the module's weights keep their storage: `check_weights()` (called once per request) compares the
  weights' addresses with those at capture and drops the graphs when a weight moved (a dtype cast by
  the trainer, say); weight *values* may change freely, which is how merged LoRAs
  (trainer.merged_lora) reach a captured graph;
- the Python side takes no different branch for the same inputs: the key includes every non-tensor
  argument, and the caller switches off anything the graph did not capture (PEFT adapter layers);
- outputs are copied out, so a caller may keep them across replays.

Graphs of one `GraphedCall` share one memory pool: they never run at once, and only their static
outputs stay alive between calls. Anything that cannot be captured runs eagerly, as does every call
off CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # on a side stream before capture: cuDNN/cuBLAS pick algorithms and allocate workspaces


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: Any


class GraphedCall:
    """`fn(*args, **kwargs)` replayed from CUDA graphs, one per distinct input signature (LRU-capped)."""

    def __init__(self, fn: Callable[..., Any], module: torch.nn.Module, *, name: str, max_graphs: int = 8) -> None:
        self._fn, self._module, self.name = fn, module, name
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._failed: set[Hashable] = set()
        self._pool: Any = None
        self._weights: tuple[int, ...] = ()
        self.capture_s = 0.0  # total time spent capturing, for benchmarks and logs
        # Part of every graph's key: what, besides the inputs, decided the kernels a graph holds.
        self.variant: Hashable = None
        # Other variants whose graphs compute the same function and may be replayed instead of
        # capturing one of `variant` (preferred in this order).
        self.reuse: tuple[Hashable, ...] = ()

    def __len__(self) -> int:
        return len(self._graphs)

    def _weight_addresses(self) -> tuple[int, ...]:
        # LoRA parameters of an injected training adapter are left out: the graphs never compute them.
        return tuple(p.data_ptr() for n, p in self._module.named_parameters() if "lora_" not in n)

    def check_weights(self) -> None:
        """Drop every graph if any weight of the module moved since capture (see the module docstring)."""
        if self._graphs and self._weight_addresses() != self._weights:
            log.info("%s: weights moved; dropping %d CUDA graph(s)", self.name, len(self._graphs))
            self.clear()

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        signature = _signature(leaves, spec)
        key = None if signature is None else (self.variant, signature)
        if key is None or key in self._failed:
            return self._fn(*args, **kwargs)
        candidates = [(variant, signature) for variant in (*self.reuse, self.variant)]
        found = next((k for k in candidates if k in self._graphs), None)
        if found is None:
            entry = self._capture(key, leaves, spec)
            if entry is None:
                return self._fn(*args, **kwargs)
        else:
            entry = self._graphs[found]
            self._graphs.move_to_end(found)
        for static, value in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor)), strict=True):
            static.copy_(value)
        entry.graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.output)

    def _capture(self, key: Hashable, leaves: list[Any], spec: pytree.TreeSpec) -> _Graph | None:
        started = time.monotonic()
        if not self._graphs:
            self._weights = self._weight_addresses()
        statics = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(statics, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self._fn(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            log.warning("%s: cannot capture a CUDA graph for these inputs, running them eagerly: %s", self.name, exc)
            self._failed.add(key)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = _Graph(graph, [x for x in statics if isinstance(x, torch.Tensor)], output)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        elapsed = time.monotonic() - started
        self.capture_s += elapsed
        log.info("%s: captured a CUDA graph in %.2f s (%d held)", self.name, elapsed, len(self._graphs))
        return entry


def _signature(leaves: list[Any], spec: pytree.TreeSpec) -> Hashable | None:
    """A hashable key for the inputs, or None when they cannot be graphed (CPU tensors, odd objects)."""
    parts: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda":
                return None
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device.index))
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            parts.append((type(leaf).__name__, leaf))
        else:
            return None
    return tuple(parts)


class Override:
    """Within `with`, `module.<method>` is `replacement` (a GraphedCall, a compiled forward); the
    module is untouched after.

    The replacement is an instance attribute, so only this module object sees it, and only for the
    length of the block: the trainer, which graphs its own training step, never meets it.
    """

    def __init__(self, module: torch.nn.Module, method: str, replacement: Callable[..., Any]) -> None:
        self.module, self.method, self.replacement = module, method, replacement

    def __enter__(self) -> None:
        if self.method in vars(self.module):
            raise RuntimeError(f"{self.method} of this module is already replaced")
        setattr(self.module, self.method, self.replacement)

    def __exit__(self, *exc: object) -> None:
        delattr(self.module, self.method)


class PipelineGraphs:
    """CUDA graphs for a diffusers pipeline's two heavy calls: the UNet's forward and the VAE's decode.

    `installed()` puts them in place for a block (after dropping graphs whose weights moved). Keep one
    instance for as long as its captures are useful: a generation engine keeps one for its lifetime,
    a batch of class images one for the batch.
    """

    def __init__(self, pipe: Any) -> None:
        unet, vae = pipe.unet, pipe.vae
        self.unet = GraphedCall(unet.forward, unet, name="UNet")
        self.decode = GraphedCall(vae.decode, vae, name="VAE decoder")
        self._replacements = [(unet, "forward", self.unet), (vae, "decode", _without_generator(self.decode))]

    @property
    def capture_s(self) -> float:
        return self.unet.capture_s + self.decode.capture_s

    @contextlib.contextmanager
    def installed(self, variant: Hashable = None, reuse: tuple[Hashable, ...] = ()) -> Iterator[None]:
        """`variant` names what else shapes the captured kernels (compiled blocks, say): graphs
        captured under one variant are replayed under another only where that one lists it in `reuse`
        (which it may when both compute the same function: a graph replays its kernels whatever
        Python-side modules are installed at the time)."""
        self.unet.check_weights()
        self.decode.check_weights()
        self.unet.variant = self.decode.variant = variant
        self.unet.reuse = self.decode.reuse = reuse
        with contextlib.ExitStack() as stack:
            for module, method, replacement in self._replacements:
                stack.enter_context(Override(module, method, replacement))
            yield


def _without_generator(decode: Callable[..., Any]) -> Callable[..., Any]:
    """The VAE's decode as pipelines call it: they pass their generators, which AutoencoderKL ignores
    and which would otherwise be part of every graph's key."""

    def call(z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        return decode(z, return_dict=return_dict)

    return call
