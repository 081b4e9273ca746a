"""Base models: random offline pipelines for tests and benchmarks, and loading real ones.

Everything returned is a diffusers pipeline with the same component types as Stable Diffusion, so the
trainer and the generation engine never need to know whether the weights are real. Nothing here ever
downloads unless a Hugging Face id is asked for with the hub reachable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from trainer import quantization
from trainer.errors import DeviceUnavailable, ModelUnavailable

log = logging.getLogger(__name__)

RandomKind = Literal["tiny", "sd15-random", "tiny-sdxl", "sdxl-random", "tiny-flux", "flux-random"]
RANDOM_KINDS: tuple[str, ...] = ("tiny", "sd15-random", "tiny-sdxl", "sdxl-random", "tiny-flux", "flux-random")
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
T5_TOKENIZER_DIR = TOKENIZER_DIR / "t5"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# A key only SDXL single-file checkpoints have (the second, OpenCLIP-G text encoder).
SDXL_KEY_PREFIX = "conditioner.embedders.1"
# Flux single files (Black Forest Labs' layout) hold the transformer alone: its double-stream blocks.
FLUX_KEY_PREFIXES = ("double_blocks.", "model.diffusion_model.double_blocks.")
# Where a Flux single file's text encoders, VAE and scheduler come from (the hub, or its local cache).
FLUX_COMPONENTS = "black-forest-labs/FLUX.1-dev"
# FLUX.1-dev's scheduler/scheduler_config.json: flow matching with the shift chosen per image size.
FLUX_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}

# The noise schedule every Stable Diffusion 1.x/2.x/XL checkpoint was trained with.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "steps_offset": 1}


def load_tokenizer() -> CLIPTokenizer:
    """The project's own small byte-level BPE CLIP tokenizer (see trainer/tokenizer/build_vocab.py)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def load_t5_tokenizer() -> T5TokenizerFast:
    """The project's own small unigram T5 tokenizer (see trainer/tokenizer/build_t5_vocab.py)."""
    return T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR))


def _text_config(tokenizer: CLIPTokenizer, *, hidden: int, layers: int, heads: int, intermediate: int,
                 projection: int, act: str = "quick_gelu", vocab: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act=act, projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks keep vae_scale_factor = 8, so latent shapes match the real model at any resolution.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8, scaling_factor=0.18215,
    )


def _build_tiny() -> StableDiffusionPipeline:
    tokenizer = load_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, heads=4, intermediate=64,
                                              projection=32))
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _build_tiny_sdxl() -> StableDiffusionXLPipeline:
    tokenizer = load_tokenizer()
    tokenizer_2 = load_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, heads=4, intermediate=64,
                                              projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden=32, layers=2, heads=4, intermediate=64, projection=32, act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        # SDXL conditions on both encoders' hidden states (32 + 32) and on pooled text + 6 size ids.
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False,
    )


def _sd_vae(sample_size: int, scaling_factor: float) -> AutoencoderKL:
    """The KL autoencoder every Stable Diffusion 1.x/2.x/XL release ships; only its scale and the
    size it was trained at differ."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=scaling_factor,
    )


def sdxl_unet_config() -> dict[str, object]:
    """The UNet of stabilityai/stable-diffusion-xl-base-1.0 (its unet/config.json), about 2.57B parameters."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        # Both encoders' penultimate states (768 + 1280) for cross-attention; the pooled OpenCLIP
        # embedding (1280) and six size ids of 256 each (1536) through the added embedding.
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def _build_sdxl(device: str) -> StableDiffusionXLPipeline:
    """The SDXL base 1.0 architecture with random weights, initialised directly on `device`.

    Both tokenizers are the project's own (SDXL's two differ only in their padding token); the
    encoders keep the real vocabulary size, so real token ids would fit them.
    """
    tokenizer, tokenizer_2 = load_tokenizer(), load_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config())  # type: ignore[arg-type]
        vae = _sd_vae(1024, 0.13025)
        # CLIP ViT-L/14 (as in SD1.5) and OpenCLIP ViT-bigG/14 with its text projection.
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=768, layers=12, heads=12,
                                                  intermediate=3072, projection=768, vocab=49408))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, hidden=1280, layers=32, heads=20, intermediate=5120, projection=1280,
                         act="gelu", vocab=49408))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        # SDXL's scheduler/scheduler_config.json: Euler over the SD schedule, "leading" spacing.
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False,
    )


def _build_sd15(device: str) -> StableDiffusionPipeline:
    """The Stable Diffusion 1.5 architecture with random weights, initialised directly on `device`.

    Initialising 1.1B parameters on the CPU and copying them over takes most of a minute; creating them
    inside a `torch.device` context runs the same initialisers on the GPU in about a second.
    """
    tokenizer = load_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        )
        vae = _sd_vae(512, 0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=768, layers=12, heads=12,
                                                  intermediate=3072, projection=768, vocab=49408))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def flux_transformer_config() -> dict[str, object]:
    """The transformer of black-forest-labs/FLUX.1-dev (its transformer/config.json), about 11.9B parameters:
    19 double-stream and 38 single-stream blocks of 24 heads of 128, reading T5-XXL's 4096-wide states,
    CLIP-L's pooled 768 and the distilled guidance scale."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _flux_vae(sample_size: int, blocks: tuple[int, ...], groups: int, layers: int) -> AutoencoderKL:
    """Flux's autoencoder: 16 latent channels, no quantisation convolutions, a shift and a scale
    (FLUX.1-dev's vae/config.json); `sample_size` is the picture size the engine draws by default."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, sample_size=sample_size, layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=blocks, norm_num_groups=groups, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _t5_config(tokenizer: T5TokenizerFast, *, d_model: int, d_ff: int, d_kv: int, heads: int, layers: int,
               vocab: int | None = None) -> T5Config:
    # T5 v1.1 (FLUX.1-dev's text_encoder_2 is T5-XXL v1.1): gated GELU, no tied embeddings.
    return T5Config(vocab_size=vocab or len(tokenizer), d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads,
                    num_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id)


def _build_tiny_flux() -> FluxPipeline:
    tokenizer, tokenizer_2 = load_tokenizer(), load_t5_tokenizer()
    # Flux reads CLIP's pooled output only; T5's states are the sequence it attends to.
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, heads=4, intermediate=64,
                                              projection=32))
    text_encoder_2 = T5EncoderModel(_t5_config(tokenizer_2, d_model=32, d_ff=64, d_kv=8, heads=4, layers=2))
    # 16 latent channels packed 2x2 make the 64 input channels; the rope axes add up to the head size.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
                        vae=_flux_vae(64, (8, 16, 16, 16), 8, 1), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _build_flux(device: str) -> FluxPipeline:
    """The FLUX.1-dev architecture with random weights, initialised directly on `device` (17B parameters
    with T5-XXL: build it on the GPU, in bf16). Both tokenizers are the project's own; the encoders keep
    the real vocabulary sizes."""
    tokenizer, tokenizer_2 = load_tokenizer(), load_t5_tokenizer()
    with torch.device(device):
        transformer = FluxTransformer2DModel(**flux_transformer_config())  # type: ignore[arg-type]
        vae = _flux_vae(1024, (128, 256, 512, 512), 32, 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=768, layers=12, heads=12,
                                                  intermediate=3072, projection=768, vocab=49408))
        # google/t5-v1_1-xxl's encoder, as FLUX.1-dev ships it.
        text_encoder_2 = T5EncoderModel(_t5_config(tokenizer_2, d_model=4096, d_ff=10240, d_kv=64, heads=64,
                                                   layers=24, vocab=32128))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


@contextlib.contextmanager
def _seeded(seed: int, dtype: torch.dtype | None) -> Iterator[None]:
    """Seed the global RNGs for weight initialisation without disturbing the caller's RNG state, and
    create parameters directly in `dtype` (cheaper than casting, and diffusers warns on every cast)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def build_random_pipeline(kind: RandomKind, seed: int = 0, *, device: str = "cpu",
                          dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """A randomly initialised pipeline of the given kind, built offline and reproducible from `seed`.

    'tiny' (SD1.5 layout, 64 px), 'tiny-sdxl' and 'tiny-flux' (FLUX.1 layout) build in about a second on
    a CPU; 'sd15-random', 'sdxl-random' and 'flux-random' are the full SD1.5, SDXL base 1.0 and FLUX.1-dev
    architectures for benchmarks, fastest built with `device='cuda'` (SDXL's 3.5B parameters take
    minutes to initialise on a CPU, Flux's 17B far longer).
    """
    if kind not in RANDOM_KINDS:
        raise ValueError(f"unknown random model kind {kind!r}; choose one of {', '.join(RANDOM_KINDS)}")
    with _seeded(seed, dtype):
        if kind == "tiny":
            pipe = _build_tiny()
        elif kind == "tiny-sdxl":
            pipe = _build_tiny_sdxl()
        elif kind == "sdxl-random":
            pipe = _build_sdxl(device)
        elif kind == "tiny-flux":
            pipe = _build_tiny_flux()
        elif kind == "flux-random":
            pipe = _build_flux(device)
        else:
            pipe = _build_sd15(device)
    # In inference mode, as `from_pretrained` leaves a loaded model: T5 has dropout, which would draw
    # from the global generator while prompts are encoded.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe.to(device)


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model's weights to `dtype` in place.

    diffusers' `ModelMixin.to` warns about fp32-only modules on every dtype cast, even when the model
    has none; torch's own `Module.to` does the same cast without the noise.
    """
    return torch.nn.Module.to(module, dtype=dtype)


def save_random_model(kind: RandomKind, out_dir: Path | str, seed: int = 0) -> Path:
    """Build a random pipeline and save it as a diffusers folder that `load_pipeline` reads back."""
    out = Path(out_dir)
    pipe = build_random_pipeline(kind, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("saved random %s model to %s", kind, out)
    return out


def pick_device(requested: str = "auto") -> str:
    """Resolve 'auto' to the best local accelerator; refuse an explicit one that is not there."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("A CUDA GPU was asked for, but none is available here. "
                                "Use --device cpu (slow) or check the GPU driver and the PyTorch build.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable("Apple MPS was asked for, but it is not available here. Use --device cpu.")
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceUnavailable(f"Unknown device {requested!r}; use auto, cpu, cuda or mps.")
    return requested


def pick_dtype(device: str) -> torch.dtype:
    """bf16 where the GPU supports it (no loss scaling needed), fp16 on older CUDA and MPS, fp32 on CPU."""
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(spec: str) -> bool:
    """Hugging Face ids are `name` or `owner/name`; anything else that names a file system entry is a path."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.lower().endswith(SINGLE_FILE_SUFFIXES) or Path(spec).expanduser().exists())


def _single_file_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint, without loading the tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    return list(state.get("state_dict", state))


def _is_sdxl_single_file(path: Path) -> bool:
    """Decide SDXL vs SD1.x from the checkpoint's keys, without loading the tensors."""
    return any(k.startswith(SDXL_KEY_PREFIX) for k in _single_file_keys(path))


def is_flux_single_file(path: Path) -> bool:
    """Whether a checkpoint is a Flux transformer in Black Forest Labs' layout (flux1-dev.safetensors)."""
    return any(k.startswith(FLUX_KEY_PREFIXES) for k in _single_file_keys(path))


def _load_flux_single_file(path: Path, dtype: torch.dtype | None, offline: bool) -> DiffusionPipeline:
    """A Flux transformer from a single file, with the other components of FLUX.1-dev (text encoders,
    VAE, scheduler) from the hub or its local cache: Flux single files hold the transformer alone."""
    transformer = FluxTransformer2DModel.from_single_file(str(path), torch_dtype=dtype, local_files_only=offline,
                                                          config=FLUX_COMPONENTS, subfolder="transformer")
    return FluxPipeline.from_pretrained(FLUX_COMPONENTS, transformer=transformer, torch_dtype=dtype,
                                        local_files_only=offline)


def _load_single_file(path: Path, dtype: torch.dtype | None, offline: bool,
                      sdxl: bool | None) -> DiffusionPipeline:
    from safetensors import SafetensorError

    if not path.is_file():
        raise ModelUnavailable(f"The model file {path} does not exist. Check the path in the base model "
                               "setting.")
    try:
        if sdxl is None and is_flux_single_file(path):
            return _load_flux_single_file(path, dtype, offline)
        is_xl = _is_sdxl_single_file(path) if sdxl is None else sdxl
        cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
        extra = {} if is_xl else {"safety_checker": None, "requires_safety_checker": False}
        return cls.from_single_file(str(path), torch_dtype=dtype, local_files_only=offline, **extra)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, SafetensorError) as exc:
        raise ModelUnavailable(
            f"Could not load the checkpoint {path.name} as a Stable Diffusion or Flux model "
            f"({type(exc).__name__}: {exc}). Check that it is an SD 1.x, SDXL or FLUX.1 checkpoint; loading "
            "one also needs its diffusers configuration (and for Flux the text encoders and VAE of "
            f"{FLUX_COMPONENTS}) from the Hugging Face hub once (or from the local cache), so with no network "
            "convert it to a diffusers folder first."
        ) from exc


def _load_pretrained(spec: str, dtype: torch.dtype | None, offline: bool, is_path: bool) -> DiffusionPipeline:
    what = f"the folder {spec}" if is_path else f"the Hugging Face model {spec!r}"
    try:
        index = DiffusionPipeline.load_config(spec, local_files_only=offline)
        extra = ({"safety_checker": None, "requires_safety_checker": False}
                 if "safety_checker" in index else {})
        return DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, local_files_only=offline,
                                                 **extra)
    except (OSError, ValueError) as exc:
        if is_path:
            hint = "Check that it is a diffusers model folder (it must contain model_index.json)."
        elif offline:
            hint = ("The hub is switched off (offline mode) and the model is not in the local cache: "
                    "download it once with the network on, or point the base model at a local folder.")
        else:
            hint = ("Check the model id, the network connection, and for gated models your Hugging Face "
                    "token (HF_TOKEN); or point the base model at a local folder or .safetensors file.")
        raise ModelUnavailable(f"Could not load {what}. {hint}") from exc


def load_pipeline(spec: str, device: str = "cpu", dtype: torch.dtype | None = None, *,
                  offline: bool | None = None, sdxl: bool | None = None,
                  quantize: str = quantization.NONE) -> DiffusionPipeline:
    """Load a base model from a random kind, a Hugging Face id, a diffusers folder or a single file.

    `dtype` defaults to the device's best (`pick_dtype`). `offline` defaults to the HF_HUB_OFFLINE
    environment variable; offline loads come from the local Hugging Face cache only. `sdxl` forces the family of a single-file checkpoint (default: inspect keys).
    `quantize` ("int8", Flux only) quantises the transformer's Linear weights (trainer.quantization)
    before the model moves to `device`, so the GPU never holds the 16-bit transformer; a random kind
    is built where it runs and quantised after (for benchmarks).
    Raises ModelUnavailable with what was tried and what to do when the model cannot be had.
    """
    quantization.check_mode(quantize)
    if offline is None:
        offline = _env_offline()
    if dtype is None:
        dtype = pick_dtype(device)
    if spec in RANDOM_KINDS:
        pipe = build_random_pipeline(spec, device=device, dtype=dtype)  # type: ignore[arg-type]
        quantization.quantize_denoiser(pipe, quantize)
        return prepare_for_device(pipe)
    is_path = _looks_like_path(spec)
    if is_path:
        path = Path(spec).expanduser()
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            pipe = _load_single_file(path, dtype, offline, sdxl)
        elif not path.is_dir():
            raise ModelUnavailable(f"The model folder {path} does not exist. Check the base model setting, "
                                   "or build an offline test model with `python -m trainer make-model tiny "
                                   f"{path}`.")
        else:
            pipe = _load_pretrained(str(path), dtype, offline, is_path=True)
    else:
        pipe = _load_pretrained(spec, dtype, offline, is_path=False)
    log.info("loaded base model %s", spec)
    quantization.quantize_denoiser(pipe, quantize, device=device)
    return prepare_for_device(pipe.to(device))


def prepare_for_device(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Lay the UNet's weights out for the device: channels-last on CUDA.

    cuDNN's convolutions work in NHWC; with NCHW weights every convolution of the UNet converts its
    input and output, a large share of a step's GPU time. The VAE is left alone: its decoder measured
    slower channels-last (both in bench/RESULTS.md). Flux's transformer has no convolutions.
    """
    if pipe.device.type == "cuda" and getattr(pipe, "unet", None) is not None:
        pipe.unet.to(memory_format=torch.channels_last)
    return pipe
