"""Regional `torch.compile` for generation: the blocks of the UNet and of the VAE decoder.

With CUDA graphs (trainer.graphs) a denoising step is bound by its kernels, and a third of those are
GroupNorm statistics, normalisation, SiLU, casts and residual adds that eager PyTorch runs one by one
(on channels-last tensors through extra strided copies). Inductor fuses them into a few Triton
kernels. Measured on an H200 (bench/RESULTS.md): the UNet call of one picture 10.3 -> 8.1 ms, of
four 27.0 -> 22.0 ms, the VAE decode 20.6 -> 11.5 ms.

Why blocks and not the whole UNet: the blocks repeat, so the compiled code of one block class serves
all of them, and with dynamic shapes every picture count and most sizes too (a new size costs a
recompile of 8-9 s, once per process). Compiling the whole UNet took 68-82 s for every picture shape;
these blocks compile in about 100 s for the UNet and 60 s for the decoder on the H200. Inductor keeps
the result in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, which the worker points into its data
folder) and a restart loads it from there: a worker's whole warm-up then took 31-35 s. The compiled
code holds no weights (they are its inputs), so the cache holds nothing personal and every person's
merged LoRA reaches it.

The compiled blocks are in place only inside `installed()`. The generation engine installs them
while it captures and replays its graphs; the trainer never meets them (compiling the training step
measured 20.1 -> 18.2 ms per step for 140 s of compiling: not worth it). When a picture is made
between training steps, the training's PEFT layers sit inside the transformer blocks: those blocks
then run plain (`skip_adapters`), because tracing the adapters' Python would mean compiling in the
middle of a training, while the ResNet blocks, which hold no adapter, stay compiled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from peft.tuners.tuners_utils import BaseTunerLayer

from trainer.graphs import Override

log = logging.getLogger(__name__)

UNET_BLOCKS: tuple[type[torch.nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock)
DECODER_BLOCKS: tuple[type[torch.nn.Module], ...] = (ResnetBlock2D,)
# Dynamo keeps one compiled variant per block kind it meets (with or without a shortcut, with or
# without a time embedding, ...); its default limit of 8 per function would send the rest back to eager.
RECOMPILE_LIMIT = 64


class CompiledBlocks:
    """Compiled `forward`s for the repeated blocks of a pipeline's UNet and VAE decoder.

    Nothing is compiled until a block first runs inside `installed()`. `backend` is torch.compile's
    (tests pass a cheap one; inductor needs a GPU to pay off).
    """

    def __init__(self, pipe: Any, *, backend: str | Callable[..., Any] = "inductor") -> None:
        blocks = [m for m in pipe.unet.modules() if isinstance(m, UNET_BLOCKS)]
        blocks += [m for m in pipe.vae.decoder.modules() if isinstance(m, DECODER_BLOCKS)]
        self.blocks = blocks
        self._compiled = [torch.compile(block.forward, dynamic=True, backend=backend) for block in blocks]
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        # A block that fails to compile (no C compiler for Triton's launchers, an unsupported GPU)
        # runs as it is, with the failure in the log, instead of failing people's pictures.
        torch._dynamo.config.suppress_errors = True

    def __len__(self) -> int:
        return len(self.blocks)

    @contextlib.contextmanager
    def installed(self, *, skip_adapters: bool = False) -> Iterator[None]:
        """Within the block, each block's `forward` is its compiled one; the modules are untouched after.

        `skip_adapters`: blocks holding PEFT adapter layers keep their plain `forward`.
        """
        with contextlib.ExitStack() as stack:
            for block, compiled in zip(self.blocks, self._compiled, strict=True):
                if skip_adapters and any(isinstance(m, BaseTunerLayer) for m in block.modules()):
                    continue
                stack.enter_context(Override(block, "forward", compiled))
            yield
