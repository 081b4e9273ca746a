"""What a worker process needs to start, the same for a local child process and a Celery worker."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.requests import TRAIN_DEFAULTS

SAFETY_MODES = ("off", "prompts", "images")  # the SAFETY setting (bot.safety)
# The QUANTIZE setting: the denoiser's Linear weights as loaded ("none") or in int8 (trainer.quantization).
QUANTIZE_MODES = ("none", "int8")


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to start: the model, its device and where it may keep files."""

    base_model: str
    device: str
    work_dir: str
    class_cache_dir: str
    log_level: str = "INFO"
    max_adapters: int = 8
    # CPU threads for torch in this worker; 0 keeps torch's default (all cores). Several CPU workers
    # on one host must share the cores, or their thread pools fight and each runs many times slower.
    cpu_threads: int = 0
    # On a GPU, compile the UNet's stages and the VAE decoder for generation (trainer.compiled_blocks),
    # keeping inductor's compiled kernels in `compile_cache_dir` so a restart reads them back.
    compile_generation: bool = True
    compile_cache_dir: str = ""
    # With compile_generation: the warm-up's square pictures also get code compiled for their static
    # shapes (trainer.compiled_blocks.ByShape): a little faster, for minutes more at the first start.
    compile_static_shapes: bool = True
    # On a GPU, compile the training step's UNet stages (TrainConfig.compiled_stages), at the worker's
    # start for trainings of LoRA rank `train_rank` (another rank compiles in its first training).
    compile_training: bool = True
    train_rank: int = TRAIN_DEFAULTS.rank
    # torch.compile's backend for all of the above: "inductor" compiles on a GPU only, where it pays;
    # any other (a name torch knows, or "package.module:function") compiles on every device, which
    # is for tests and experiments.
    compile_backend: str = "inductor"
    # On a GPU, processes that compile parts of the start beside the worker (trainer.start_helpers):
    # below 0, as many as the GPU's free memory and this worker's share of the host's CPUs allow
    # (the host's CPUs split between `workers_on_host` workers); 0, none.
    start_helpers: int = -1
    workers_on_host: int = 1
    # The image checker run on every picture (trainer.safety_checker): a Hugging Face id or a folder,
    # "" the standard one for the base model, None none (SAFETY is off or prompts).
    safety_checker: str | None = None
    # The base model's denoiser weights: "none" as loaded, "int8" kept in int8 (Flux only; trainer.quantization).
    quantize: str = "none"


def safety_checker_to_load(safety: str, checker: str) -> str | None:
    """WorkerConfig.safety_checker from the SAFETY and SAFETY_CHECKER settings."""
    return checker.strip() if safety == "images" else None

