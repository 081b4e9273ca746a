"""What a person asks for, checked once: a picture request and a training's settings, with every
default and limit written here only.

The bot validates a request when it is queued, the worker and the command line build from the same
types, so a request the bot accepts is one the worker can run, and a bad one is refused with the
same message wherever it is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

Aspect = Literal["square", "portrait", "landscape"]
ASPECTS: tuple[str, ...] = ("square", "portrait", "landscape")
MAX_IMAGES = 4
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_SEED = 2**53  # seeds travel through JSON; above this they stop being exact
# Sampling schedulers by name (trainer.noise_schedulers builds them); the first is the default.
SCHEDULER_NAMES: tuple[str, ...] = ("dpmpp_2m", "euler_a", "euler", "ddim", "unipc")
DEFAULT_SCHEDULER = SCHEDULER_NAMES[0]
# `/train steps:` may ask for another number of steps than the server's default, within these.
MIN_TRAIN_STEPS, MAX_TRAIN_STEPS = 50, 5000


@dataclass(frozen=True)
class Style:
    """A named look: how the subject is introduced, and words appended to the prompt."""

    subject: str
    words: str


STYLES: dict[str, Style] = {
    "photo": Style("a photo of", "photograph, natural light, sharp focus, detailed"),
    "portrait": Style("a portrait photo of", "close up portrait, soft studio lighting, bokeh, 85mm lens"),
    "cinematic": Style("a cinematic film still of", "cinematic lighting, dramatic, film grain, wide angle"),
    "oil painting": Style("an oil painting of", "oil painting on canvas, visible brush strokes, classical"),
    "anime": Style("an anime drawing of", "anime style, cel shading, vibrant colors, clean line art"),
    "watercolor": Style("a watercolor painting of", "watercolor painting, soft washes, paper texture"),
    "3d render": Style("a 3d render of", "3d render, octane render, soft global illumination"),
    "pixar": Style("a 3d animated character of", "pixar style 3d animation, cute, expressive eyes"),
}


class BadRequest(Exception):
    """A request that cannot be run; `message` says why to the person who made it."""

    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class GenerateRequest:
    """What a person asked for. Image `i` of a request uses seed `seed + i`.

    `strength` (0-1, how far a variation may move from its starting picture) applies only when the
    engine is given an `init_image`; without one the request is an ordinary generation. `face_pass`:
    faces found in pictures made with a person's model are redrawn at the model's native size.
    `guidance` None: the base model's own default (7 for Stable Diffusion, 3.5 for Flux's distilled
    guidance), which the worker fills in.
    """

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    seed: int | None = None
    steps: int = 25
    guidance: float | None = None
    aspect: Aspect = "square"
    scheduler: str = DEFAULT_SCHEDULER
    style: str | None = None
    strength: float | None = None
    face_pass: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise BadRequest(f"You can ask for 1 to {MAX_IMAGES} pictures at a time.")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - MAX_IMAGES:
            raise BadRequest(f"A seed is a whole number from 0 to {MAX_SEED - MAX_IMAGES}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise BadRequest(f"Steps must be between 1 and {MAX_STEPS}.")
        if self.guidance is not None and not 0 <= self.guidance <= MAX_GUIDANCE:
            raise BadRequest(f"Guidance must be between 0 and {MAX_GUIDANCE:g}.")
        if self.aspect not in ASPECTS:
            raise BadRequest(f"Unknown shape {self.aspect!r}; choose one of {', '.join(ASPECTS)}.")
        if self.scheduler not in SCHEDULER_NAMES:
            raise BadRequest(f"Unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}.")
        if self.style and self.style not in STYLES:
            raise BadRequest(f"Unknown style {self.style!r}; choose one of {', '.join(STYLES)}.")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise BadRequest("Variation strength must be above 0 and at most 1.")

    def check_length(self, max_chars: int) -> None:
        """Refuse a prompt or negative prompt longer than `max_chars` characters (the operator's
        MAX_PROMPT_CHARS); the model's token limit is checked where its tokenizer is."""
        for what, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if len(text) > max_chars:
                raise BadRequest(f"That {what} is {len(text)} characters; the limit is {max_chars}. "
                                 "Please shorten it.")


def check_train_steps(steps: int) -> None:
    """Refuse a number of training steps outside what `/train steps:` allows."""
    if not MIN_TRAIN_STEPS <= steps <= MAX_TRAIN_STEPS:
        raise BadRequest(f"Steps must be between {MIN_TRAIN_STEPS} and {MAX_TRAIN_STEPS}.")


MixedPrecision = Literal["auto", "bf16", "fp16", "no"]


@dataclass(frozen=True)
class TrainConfig:
    """A training's settings. The defaults are for faces on SD1.5 at 512 px on one GPU (what differs on
    SDXL is in jobs.train_defaults); each says where it comes from beside it (diffusers'
    `train_dreambooth_lora.py`, the DreamBooth and Min-SNR papers, kohya's usual choices for people).
    Measured costs of the speed options are in bench/RESULTS.md."""

    # Faces need more than the 500 steps diffusers' example gives objects (800-1200 were best for faces
    # in the HF DreamBooth study); 1e-4 constant is the example's rate.
    steps: int = 800
    learning_rate: float = 1e-4
    # Rank 4 (diffusers' default) misses facial detail; 16 is kohya's usual for people (a ~6 MB file).
    # alpha=rank (None) gives LoRA scale 1, so the learning rate means what it does in diffusers.
    rank: int = 16
    alpha: int | None = None
    # Text-encoder LoRA helps likeness a little but overfits quickly; when on, half the UNet's rate.
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    # The DreamBooth paper's lambda=1 keeps "a woman" from collapsing onto one person; 100 class
    # images (cached and shared per class) is the example's order of magnitude.
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    resolution: int = 512
    batch_size: int = 1
    gradient_checkpointing: bool = False  # slower; for GPUs with little memory
    # auto: bf16 where supported, else fp16 with loss scaling on a GPU, fp32 on a CPU; a given
    # pipeline's own dtype is kept.
    mixed_precision: MixedPrecision = "auto"
    use_8bit_adam: bool = False  # saves little for LoRA-sized optimiser state
    snr_gamma: float | None = 5.0  # Min-SNR weighting (Hang et al., 2023): the paper's gamma
    noise_offset: float = 0.0  # helps very dark or bright pictures, but shifts skin tones in portraits
    seed: int = 0
    # Resumable points, and one after the last step, so a job stopped while saving trains nothing again.
    checkpoint_every: int = 200
    preview_every: int = 0  # previews cost a short generation each; callers turn them on
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the example's projections
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    min_photos: int = 5  # below that, likeness is unreliable
    # Class images need only be plausible members of their class.
    class_image_steps: int = 25
    class_image_batch: int = 8
    preview_resolution: int = 256
    preview_steps: int = 12
    # On CUDA, the step's UNet forward and backward replay CUDA graphs (with cached text embeddings
    # and no gradient checkpointing); launching thousands of small kernels from Python costs more
    # than computing them.
    cuda_graphs: bool = True
    # The UNet's stages compiled by inductor for the graphed step (trainer.compiled_blocks), once per
    # process and kind of step. None: where the step is graphed; True: also without graphs; False: never.
    compiled_stages: bool | None = None
    # In the compiled step, projections reading one input run as one GEMM (trainer.fused_linears).
    fused_linears: bool = True
    # Settings nobody chose, which take the base model's family values where the model is loaded
    # (jobs.train_defaults: 1024 px on SDXL); () keeps every value as given.
    family_defaults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON payloads carry lists
        object.__setattr__(self, "family_defaults", tuple(self.family_defaults))
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1:
            raise ValueError("steps, rank and batch_size must be at least 1")
        if self.resolution % 8 or self.resolution < 64:
            raise ValueError("resolution must be a multiple of 8, at least 64")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError("mixed_precision must be auto, bf16, fp16 or no")

    def graphs_on(self, device_type: str) -> bool:
        """Whether a training on this kind of device replays its steps as CUDA graphs."""
        return (self.cuda_graphs and device_type == "cuda" and not self.train_text_encoder
                and not self.gradient_checkpointing)

    def compiles_on(self, device_type: str) -> bool:
        """Whether a training on this kind of device runs the UNet's stages compiled."""
        return self.graphs_on(device_type) if self.compiled_stages is None else self.compiled_stages

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else self.rank

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        data["family_defaults"] = list(self.family_defaults)
        return data


TRAIN_DEFAULTS = TrainConfig()
