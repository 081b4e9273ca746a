"""Third-party notices that say nothing to the people who run this project's trainer processes
(`python -m trainer`, the workers and their start helpers), silenced by logger."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of `parts`."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in record.getMessage() for part in self.parts)


_TORCHVISION_NOTICE = _DropMessages("requires torchvision")
# What importing torchao (PEFT and diffusers import it where it is installed, for QUANTIZE=int8) says
# by logger: its CUDA-only kernels (float8, mxfp8, Triton) that int8 weights never use cannot load on
# a CPU build, torch deprecates the way it registers two enums, and diffusers cannot import tensor types
# of older torchao releases (for reading checkpoints saved quantised, which this project never does).
_TORCHAO_NOTICES = {
    "torchao": _DropMessages("Failed to load"),
    "torchao.kernel.intmm": _DropMessages("Detected no triton"),
    "torch.utils._pytree": _DropMessages("is an Enum subclass and is now natively supported"),
    "diffusers.quantizers.torchao.torchao_quantizer": _DropMessages("Unable to import `torchao` Tensor objects"),
}


def quiet_known_noise() -> None:
    """Silence third-party notices that say nothing to whoever runs a trainer process: transformers falls back
    to PIL image processors (this project uses none of them), diffusers' `torch_dtype` rename
    (still the keyword the oldest supported diffusers reads) and torchao's import notices."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_NOTICE)
    for name, notice in _TORCHAO_NOTICES.items():
        logging.getLogger(name).addFilter(notice)
    warnings.filterwarnings("ignore", message=r"`torch_dtype` is deprecated", category=FutureWarning)
