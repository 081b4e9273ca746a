"""Regional `torch.compile`: the UNet's stages and the VAE decoder, or their blocks.

With CUDA graphs (trainer.graphs) a denoising step is bound by its kernels, and a third of those are
GroupNorm statistics, normalisation, SiLU, casts, residual adds and skip-connection copies that eager
PyTorch runs one by one (on channels-last tensors through extra strided copies). Inductor fuses them
into a few Triton kernels (what each region saves: bench/RESULTS.md, "Compiled blocks").

Two sizes of region. For generation both are compiled with dynamic shapes, so that one compile
serves every picture count and most sizes (a new size costs a recompile once per process). The
UNet's stages are also compiled for the static shapes of the pictures the engine's warm-up prepares
(one and four square pictures), with the linears that read one input fused (trainer.fused_linears),
and `ByShape` runs that code for those shapes only, a little faster (bench/RESULTS.md, "Static
shapes"). The two sizes of region:
- **stages**, the default: each of the UNet's down, middle and up stages (diffusers' `down_blocks`,
  `mid_block`, `up_blocks`) and the VAE decoder as a whole. Inductor then also fuses across the
  blocks: the skip-connection concatenations, the upsamplers, the transformer's projections and
  GroupNorm. What is left outside (the time embedding, the first and last convolutions) is a handful
  of kernels. Compiling the whole UNet instead would clash with the CUDA graph that replaces its
  `forward`, for only those few kernels more; stages are faster than blocks end to end;
- **blocks**: each ResNet and transformer block of the stages, each ResNet block of the decoder. A
  picture made between training steps uses these (below), and the engine compiles them in its
  warm-up for that reason.

Compiling both takes a worker's first warm-up many minutes (bench/RESULTS.md, "Worker start").
Inductor keeps what it compiled in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, which the worker
points into its data folder) and a restart loads it from there instead of compiling again. The
training step's stages are compiled for its fixed shapes, with their projections fused
(`for_training`), once per process and kind of step; dynamic shapes would compile again at each new
training's first step. The compiled code holds no weights (they are its inputs), so the cache holds nothing personal and every
person's merged LoRA reaches it.

The compiled regions are in place only inside `installed()`. The generation engine installs them
while it captures and replays its graphs. The trainer installs the stages, with its LoRA layers
inside, while it captures its training step (trainer.dreambooth, `TrainConfig.compiled_stages`),
through `for_training()`, so that a process compiles the step once and not once per training. When a
picture is made between training steps the training's PEFT layers sit inside the stages'
transformer blocks: a region holding them runs plain (`skip_adapters`), because tracing the
adapters' Python for inference would mean compiling in the middle of a training. Such a stage is
split into its blocks, and those holding no adapter (the ResNet blocks) stay compiled.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils import _pytree as pytree

from trainer.adapters import holds_adapters
from trainer.fused_linears import PASS as FUSE_LINEARS
from trainer.graphs import Override

UNET_BLOCKS: tuple[type[torch.nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock)
DECODER_BLOCKS: tuple[type[torch.nn.Module], ...] = (ResnetBlock2D,)
# Dynamo keeps one compiled variant per region kind and shape it meets (each stage of other widths,
# blocks with or without a shortcut, ...); its default limit of 8 per function would send the rest
# back to eager.
RECOMPILE_LIMIT = 64

Backend = str | Callable[..., Any]


def backend_from_spec(spec: str) -> Backend:
    """torch.compile's backend named by a worker's setting: a name torch knows ("inductor"), or
    "package.module:function" for a backend of one's own (a stand-in in tests, an experiment)."""
    if ":" not in spec:
        return spec
    module, _, name = spec.partition(":")
    backend: Backend = getattr(importlib.import_module(module), name)
    return backend


def _with_graph_pass(backend: Backend, graph_pass: CustomGraphPass | None,
                     options: dict[str, Any] | None = None) -> tuple[Backend, dict[str, Any] | None]:
    """torch.compile's backend and options that run `graph_pass` on each graph before compiling it;
    `options` are inductor's settings (other backends have none)."""
    if backend == "inductor":
        options = {**(options or {}), **({"pre_grad_custom_pass": graph_pass} if graph_pass is not None else {})}
        return backend, options or None
    if graph_pass is None:
        return backend, None
    inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_after_pass(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graph_pass(gm.graph)
        gm.recompile()
        return inner(gm, example_inputs)

    return compile_after_pass, None


def _shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """What static-shape code is compiled for, of a call's arguments: each tensor's shape, strides,
    dtype and device, and the other arguments' values (their types where they cannot be hashed)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device)))
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            parts.append((type(leaf).__name__, leaf))
        else:
            parts.append(type(leaf).__name__)
    return tuple(parts)


class ByShape:
    """A stage's `forward` that runs the code compiled for static shapes on the inputs it was
    compiled for, and the dynamic-shape code on any other.

    Static shapes are faster (bench/RESULTS.md), but each new shape would compile again, for a minute,
    in the middle of a request. So the static code only ever meets the shapes it learned through a `runner(learn=True)`
    (the engine's warm-up: the square pictures it prepares), and the dynamic code serves the rest.
    """

    def __init__(self, static: Callable[..., Any], dynamic: Callable[..., Any]) -> None:
        self.static, self.dynamic = static, dynamic
        self.shapes: set[Hashable] = set()

    def runner(self, *, learn: bool = False, static: bool = True) -> Callable[..., Any]:
        """The stage's `forward`: `learn` adds the shapes it meets to those of the static code;
        `static=False` runs the dynamic-shape code whatever the shape."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            key = _shape_key(args, kwargs)
            if learn:
                self.shapes.add(key)
            code = self.static if static and key in self.shapes else self.dynamic
            return code(*args, **kwargs)

        return forward


@dataclass(frozen=True)
class Region:
    """A stage and its blocks, each with its compiled `forward` (compiled on first use)."""

    module: torch.nn.Module
    forward: Callable[..., Any]
    blocks: tuple[tuple[torch.nn.Module, Callable[..., Any]], ...]


class CompiledBlocks:
    """Compiled `forward`s for the stages and blocks of a pipeline's UNet and VAE decoder.

    Nothing is compiled until a region first runs inside `installed()`. `whole_stages` is what
    `installed()` uses by default (False: blocks only). `backend` is torch.compile's (tests pass a
    cheap one; inductor needs a GPU to pay off), `options` inductor's settings, `graph_pass` a pass
    run on each graph before inductor compiles it. `static_shapes`: each of the UNet's stages also
    gets code compiled for static shapes (with `static_graph_pass`), used for the shapes it learns
    (`ByShape`). The decoder keeps dynamic shapes: static ones were measured for the UNet only.
    """

    def __init__(self, pipe: Any, *, backend: Backend = "inductor", whole_stages: bool = True,
                 dynamic: bool = True, graph_pass: CustomGraphPass | None = None,
                 options: dict[str, Any] | None = None, static_shapes: bool = False,
                 static_graph_pass: CustomGraphPass | None = None) -> None:
        unet = pipe.unet
        stages = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
        kinds = [(stage, UNET_BLOCKS) for stage in stages] + [(pipe.vae.decoder, DECODER_BLOCKS)]
        compile_with = _with_graph_pass(backend, graph_pass, options)
        static_with = _with_graph_pass(backend, static_graph_pass, options)

        def compiled(module: torch.nn.Module, dynamic: bool = dynamic, how: tuple[Backend, Any] = compile_with,
                     ) -> Callable[..., Any]:
            return torch.compile(module.forward, dynamic=dynamic, backend=how[0], options=how[1])

        def stage_forward(stage: torch.nn.Module) -> Callable[..., Any]:
            if not static_shapes or stage is pipe.vae.decoder:
                return compiled(stage)
            return ByShape(compiled(stage, dynamic=False, how=static_with), compiled(stage))

        self.regions = [
            Region(stage, stage_forward(stage),
                   tuple((m, compiled(m)) for m in stage.modules() if isinstance(m, classes)))
            for stage, classes in kinds]
        self.whole_stages = whole_stages
        # Kinds of call compiled so far, as their users name them (the trainer: batch rows, rank...).
        self.compiled_for: set[Any] = set()
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        # A region that fails to compile (no C compiler for Triton's launchers, an unsupported GPU)
        # runs as it is, with the failure in the log, instead of failing people's pictures.
        torch._dynamo.config.suppress_errors = True

    @property
    def stages(self) -> list[torch.nn.Module]:
        return [region.module for region in self.regions]

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return [block for region in self.regions for block, _ in region.blocks]

    @contextlib.contextmanager
    def installed(self, *, skip_adapters: bool = False, whole_stages: bool | None = None,
                  learn_shapes: bool = False, static: bool = True) -> Iterator[None]:
        """Within the block, each stage's `forward` (or each of its blocks') is the compiled one; the
        modules are untouched after.

        `skip_adapters`: a region holding PEFT adapter layers keeps its plain `forward`; a stage
        holding them is split into its blocks. `whole_stages`: False compiles blocks only (None: the
        instance's default). With `static_shapes`: `learn_shapes` compiles the static-shape code for
        the shapes met in the block (and uses it for them from then on); `static=False` runs the
        dynamic-shape code whatever the shape.
        """
        whole = self.whole_stages if whole_stages is None else whole_stages
        with contextlib.ExitStack() as stack:
            for region in self.regions:
                if whole and not (skip_adapters and holds_adapters(region.module)):
                    forward = region.forward
                    if isinstance(forward, ByShape):
                        forward = forward.runner(learn=learn_shapes, static=static)
                    stack.enter_context(Override(region.module, "forward", forward))
                    continue
                for block, forward in region.blocks:
                    if not (skip_adapters and holds_adapters(block)):
                        stack.enter_context(Override(block, "forward", forward))
            yield


_FOR_TRAINING: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Backend, CustomGraphPass | None], CompiledBlocks]] = \
    weakref.WeakKeyDictionary()


def for_training(pipe: Any, backend: Backend = "inductor", *, fuse_linears: bool = True) -> CompiledBlocks:
    """The regions the training step compiles, one set per UNet and backend for the life of the process.

    Dynamo keeps its compiled code with the function it compiled and the backend object it was
    given, and a new `torch.compile` wrapper brings a new backend object: regions made afresh for each
    training would compile again each time. Trainings share this set, so only a process's first
    training of a kind compiles. A training's shapes never change (batch rows, resolution, prompt
    length), so the regions are compiled for static shapes, which took inductor under half the time
    of dynamic ones and gave faster kernels (bench/RESULTS.md). `fuse_linears`: linears that read
    the same input become one GEMM, and 1x1 convolutions linears (trainer.fused_linears).
    """
    per_kind = _FOR_TRAINING.setdefault(pipe.unet, {})
    graph_pass = FUSE_LINEARS if fuse_linears else None
    if (backend, graph_pass) not in per_kind:
        per_kind[backend, graph_pass] = CompiledBlocks(pipe, backend=backend, dynamic=False, graph_pass=graph_pass)
    return per_kind[backend, graph_pass]
