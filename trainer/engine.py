"""Generation: one base pipeline kept loaded, each person's LoRA merged in for their request.

Switching people is the hot path of a shared bot. A person's LoRA is read once (a few MB) and kept
resident on the GPU in a least-recently-used list; for each request its update is merged into the base
weights and the original weights are copied back afterwards (trainer.merged_lora). The denoising loop
therefore runs the plain base model, which on CUDA is replayed from CUDA graphs captured once per
picture shape (trainer.graphs) for the UNet and the VAE decoder: a step is then bound by the GPU, not
by Python launching a thousand kernels. Graphs see every person's weights because merging writes into
the same storage, so switching person never re-captures. The graphs are captured from the UNet's
stages and the decoder compiled by inductor (trainer.compiled_blocks), whose fused kernels make a
replay shorter: for the square pictures the warm-up prepares, compiled for their static shapes (an
option, on by default); for any other, for dynamic shapes. The compiling happens once per process,
in `warm_up`.

A Flux transformer kept in int8 (QUANTIZE=int8, trainer.quantization) cannot take a merge: on its
quantised layers the person's LoRA is added to their outputs for the request instead, and the weights
are never written (trainer.merged_lora says how); every other layer is merged as above.

PEFT adapter layers found on the modules (a training's, when a worker serves a picture between its
steps) are switched off for the generation and put back after it. The base model's graphs still
compute that picture, so they are replayed as they are. A picture shape without one is captured
with the stages and blocks holding adapters running plain (tracing the adapters' Python would mean
compiling in the middle of a training) and the other blocks compiled, and that graph is replayed
only next to a training.

Variations ("more like #N") run img2img from the same modules: the img2img pipeline object shares
the text-to-image pipeline's components, so nothing is loaded twice and merged LoRAs apply to both.

Thread safety: an engine is meant for one worker thread. The pipeline's modules, merged weights and
schedulers are shared mutable state, so every public method takes the engine's lock; a second
thread calling in waits for the current generation to finish.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, UnidentifiedImageError

from jobs import events, png_parameters
from jobs.events import EventSink
from jobs.payloads import Picture
from jobs.requests import MAX_IMAGES, GenerateRequest
from trainer import adapters, face_pass, lora_io, merged_lora, offload, png, prompts
from trainer import upscale as upscaling
from trainer.compiled_blocks import CompiledBlocks
from trainer.errors import Cancelled, TrainerError
from trainer.family import family_of
from trainer.fused_linears import PASS as FUSE_LINEARS
from trainer.graphs import PipelineGraphs
from trainer.noise_schedulers import SchedulerCache

log = logging.getLogger(__name__)


DEFAULT_VARIATION_STRENGTH = 0.55
# Names of the warm-up's parts (`GenerationEngine.warm_up_parts`): the stages and decoder compiled for
# pictures of any shape, the blocks for pictures drawn during trainings, and square pictures by count.
ANY_SHAPE = "any-shape"
DURING_TRAINING = "during-training"


def square_part(count: int) -> str:
    """The name of the warm-up's part that prepares `count` square pictures."""
    return f"square-{count}"


# SDXL's 1024 px base was fine-tuned on aspect buckets of about one megapixel (Podell et al. 2023,
# "SDXL", appendix I); 832x1216 is its bucket nearest 2:3, so portraits and landscapes are drawn at a
# size the model has seen rather than one merely of the right area.
SDXL_BUCKETS = {"portrait": (832, 1216), "landscape": (1216, 832)}


def image_size(aspect: str, base: int, multiple: int) -> tuple[int, int]:
    """(width, height) for an aspect: square is base x base; portrait and landscape are 2:3 and 3:2.

    Up to a 512 px base (SD 1.x) the short side stays at the base, the usual 512x768; a 1024 px base
    (SDXL) takes its trained bucket nearest the aspect (SDXL_BUCKETS); other larger bases keep
    roughly the base's pixel count. Sides are rounded to `multiple`, the size the UNet's down- and
    up-sampling divides evenly.
    """
    if aspect == "square":
        return base, base
    if base == 1024 and aspect in SDXL_BUCKETS:
        return SDXL_BUCKETS[aspect]
    if base <= 512:
        short, long = base, base * 3 / 2
    else:
        short, long = base * (2 / 3) ** 0.5, base * (3 / 2) ** 0.5
    short_px, long_px = (max(multiple, round(side / multiple) * multiple) for side in (short, long))
    return (short_px, long_px) if aspect == "portrait" else (long_px, short_px)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Pictures in [0, 1] (N, 3, H, W) on any device as (N, H, W, 3) bytes, rounded as diffusers' "pil"
    output is.

    The rounding happens on the pictures' device, so a quarter of the bytes cross to the CPU (uint8,
    not float32) and the CPU, with the GPU waiting, has less to do after the last kernel.
    """
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_pngs(images: list[Image.Image]) -> list[bytes]:
    """PNG bytes of PIL pictures, with the project's encoder (trainer.png)."""
    return png.encode_rgb([np.asarray(image.convert("RGB")) for image in images])


def _pipeline_classes(pipe: DiffusionPipeline) -> tuple[type, type, dict[str, Any]]:
    """Text-to-image and image-to-image classes for the pipeline's family, and constructor options."""
    if isinstance(pipe, FluxPipeline | FluxImg2ImgPipeline):
        return FluxPipeline, FluxImg2ImgPipeline, {}
    if isinstance(pipe, StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline):
        return StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, {"add_watermarker": False}
    if isinstance(pipe, StableDiffusionPipeline | StableDiffusionImg2ImgPipeline):
        return StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, {"requires_safety_checker": False}
    raise TrainerError(f"Generation supports Stable Diffusion 1.x/2.x, SDXL and Flux models, not "
                       f"{type(pipe).__name__}.", "model_unavailable")


def img2img_steps(steps: int, strength: float) -> int:
    """The schedule length an image-to-image call needs to run at least one step: diffusers runs
    `int(steps * strength)` of them, none for a few-step request at low strength (which fails)."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


class GenerationEngine:
    """Makes pictures with a base pipeline that is loaded once and people's LoRAs swapped in and out."""

    def __init__(self, pipeline: DiffusionPipeline, *, max_loaded_adapters: int = 8,
                 base_resolution: int | None = None, cuda_graphs: bool = True,
                 compile_blocks: bool | None = None, compile_stages: bool = True, static_shapes: bool = True,
                 compile_backend: str | Callable[..., Any] = "inductor",
                 face_detector: face_pass.Detector = face_pass.detect_faces, model_name: str = "",
                 compiled_after_warm_up: bool = False) -> None:
        """`compile_blocks`: compile the UNet and the VAE decoder (trainer.compiled_blocks); None means
        where it pays, with CUDA graphs on a GPU. `compile_stages`: compile whole stages (False: their
        blocks only, for comparison). `static_shapes`: the stages also get code compiled for the static
        shapes of the warm-up's pictures (False: a shorter warm-up, every picture runs the dynamic-shape
        code). `compile_backend` is torch.compile's. `face_detector` finds the faces the face pass
        redraws (trainer.face_pass). `model_name`: the base model as each picture's settings name it
        (jobs.png_parameters.model_name of the loaded spec: no folders). `compiled_after_warm_up`: the
        compiled code is used only for the parts `warm_up` has run (a worker serves uncompiled while
        its parts compile in the background, trainer.background_compile); False: from the first picture."""
        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        text_cls, image_cls, options = _pipeline_classes(pipeline)
        # Our own pipeline objects over the same modules: switching their scheduler leaves the caller's
        # pipeline (which the trainer also uses) untouched. Constructing one loads nothing.
        components = {k: v for k, v in pipeline.components.items()
                      if k in text_cls._get_signature_keys(text_cls)[0]}
        self._text = text_cls(**components, **options)
        self._image_cls, self._image_options = image_cls, options
        self._image: DiffusionPipeline | None = None
        self._text.set_progress_bar_config(disable=True)
        self.family = family_of(pipeline)
        # A flow-matching model samples with its own scheduler (FlowMatchEulerDiscreteScheduler): the named
        # ones (trainer.noise_schedulers) are for noise-prediction models and are not used for it.
        self._flow_scheduler = pipeline.scheduler if self.family.flow_matching else None
        self._schedulers = SchedulerCache(pipeline.scheduler.config)
        self._adapters: OrderedDict[str, merged_lora.Lora] = OrderedDict()  # key -> LoRA, oldest first
        self._lora_hashes: dict[str, str] = {}  # key -> its file's hash, for the pictures' settings
        self.model_name = model_name
        self._lock = threading.Lock()
        self.max_loaded_adapters = max_loaded_adapters
        self.base_resolution = base_resolution or self.family.base_resolution(pipeline)
        self.size_multiple = self.family.size_multiple(pipeline)
        self.tokenizers = [getattr(pipeline, name) for name in self.family.prompt_tokenizer_names]
        # Modules a LoRA may touch: the UNet or transformer and the text encoders (the trainer can train both).
        self._lora_modules: dict[str, torch.nn.Module] = {
            name: module for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)}
        # Pictures need neither gradients nor training mode, and a training freezes these modules too
        # and leaves them in eval mode (trainer.dreambooth): set so from the start, the compiled code's
        # guards (which check both) hold before, during and after a training.
        self._pipeline_modules = [*self._lora_modules.values(), pipeline.vae]
        for module in self._pipeline_modules:
            module.requires_grad_(False)
            module.eval()
        # The graphs and compiled blocks know the UNet's stages; a Flux transformer runs eagerly.
        if not self.family.graphs_and_compiling:
            cuda_graphs = compile_blocks = False
        self._graphs = PipelineGraphs(pipeline) if cuda_graphs and pipeline.device.type == "cuda" else None
        if compile_blocks is None:
            compile_blocks = self._graphs is not None
        # The stages also get code compiled for the static shapes of the pictures the warm-up prepares
        # (with their linears that share an input fused, trainer.fused_linears); other shapes run the
        # dynamic-shape code (trainer.compiled_blocks.ByShape).
        self._compiled = (CompiledBlocks(pipeline, backend=compile_backend, whole_stages=compile_stages,
                                         static_shapes=compile_stages and static_shapes,
                                         static_graph_pass=FUSE_LINEARS)
                          if compile_blocks else None)
        self._learning_shapes = False
        # The warm-up's parts whose compiled code pictures use; None: all of them, from the start.
        self._ready: set[str] | None = set() if compiled_after_warm_up else None
        self.face_detector = face_detector

    @property
    def graph_capture_s(self) -> float:
        """Seconds spent capturing CUDA graphs so far (once per picture shape)."""
        return self._graphs.capture_s if self._graphs is not None else 0.0

    @property
    def loaded_adapters(self) -> list[str]:
        """Keys of the resident adapters, least recently used first."""
        return list(self._adapters)

    def image_size(self, aspect: str) -> tuple[int, int]:
        """(width, height) of pictures of `aspect` for this model."""
        return image_size(aspect, self.base_resolution, self.size_multiple)

    def check_prompt(self, text: str, *, what: str = "prompt", added: str = "") -> None:
        """Raise PromptTooLong when `text` does not fit the text encoders (see trainer.prompts)."""
        prompts.check_prompt(self.tokenizers, text, what=what, added=added)

    def guidance_for(self, request: GenerateRequest) -> float:
        """The request's guidance scale, or the base model's default where it names none."""
        return self.family.default_guidance if request.guidance is None else request.guidance

    def prepare_prompt(self, request: GenerateRequest, handle: str | None = None,
                       class_word: str | None = None) -> tuple[str, str]:
        """The (prompt, negative prompt) the model will read, checked for length."""
        prompt = prompts.compose_prompt(request.prompt, handle, class_word, request.style)
        self.check_prompt(prompt, added=prompts.additions(request.prompt, handle, class_word, request.style))
        negative = " ".join(request.negative_prompt.split())
        self.check_prompt(negative, what="negative prompt")
        return prompt, negative

    # ---- adapters ----------------------------------------------------------------------------------
    def evict(self, adapter_key: str) -> None:
        """Forget a person's LoRA (their model was retrained or deleted); unknown keys are ignored."""
        with self._lock:
            self._lora_hashes.pop(adapter_key, None)
            if self._adapters.pop(adapter_key, None) is not None:
                log.info("unloaded adapter %s", adapter_key)

    def _lora_for(self, key: str | None, lora_path: Path | None) -> merged_lora.Lora | None:
        """`key`'s resident LoRA, read from `lora_path` first if needed; None for the base model."""
        if key is None:
            return None
        lora = self._adapters.get(key)
        if lora is not None:
            self._adapters.move_to_end(key)
            return lora
        if lora_path is None:
            raise TrainerError("This model is not loaded on the GPU worker and its file did not come "
                               "with the request; please try again.", "missing_lora")
        return self._load(key, lora_path)

    def _load(self, key: str, path: Path) -> merged_lora.Lora:
        # Evict only after the new LoRA was read: a damaged file must not cost a resident one.
        started = time.perf_counter()
        try:
            lora = merged_lora.read_lora(path, self._lora_modules)
        except merged_lora.UnusableLora as exc:
            log.warning("could not load LoRA %s: %s", key, exc)
            raise TrainerError("This model's file could not be loaded into the base model here. It may be "
                               "damaged or made for a different base model; training it again fixes "
                               "that.", "bad_lora") from exc
        self._adapters[key] = lora
        self._lora_hashes[key] = png_parameters.lora_hash(path)
        while len(self._adapters) > self.max_loaded_adapters:
            old_key, _ = self._adapters.popitem(last=False)
            self._lora_hashes.pop(old_key, None)
            log.info("unloaded least recently used adapter %s", old_key)
        log.info("loaded adapter %s (%d layers, %.1f MB) in %.0f ms (%d resident)", key, lora.layers,
                 lora.nbytes / 1e6, (time.perf_counter() - started) * 1000, len(self._adapters))
        return lora

    @contextlib.contextmanager
    def _applied(self, lora: merged_lora.Lora | None, *, graphs: bool = True) -> Iterator[None]:
        """The pipeline computing with `lora` merged, PEFT layers off and (`graphs`) CUDA graphs in place."""
        states = {name: adapters.snapshot(module) for name, module in self._lora_modules.items()}
        for name, state in states.items():
            if state is not None:
                adapters.set_enabled(self._lora_modules[name], False)
        training = any(state is not None for state in states.values())
        # A caller's training loop may have left a module in training mode; pictures run in eval mode
        # (what the warm-up compiled for), and every submodule's own mode comes back afterwards.
        modes = {sub: sub.training for module in self._pipeline_modules if module.training
                 for sub in module.modules()}
        for sub in modes:
            sub.training = False
        try:
            with contextlib.ExitStack() as stack:
                # A Flux training parks its text encoders and VAE off the GPU (trainer.offload).
                stack.enter_context(offload.unparked(self._pipeline_modules))
                stack.enter_context(merged_lora.merged(lora))
                # The square pictures' warm-up is what compiles their code: it always runs it.
                if self._compiled is not None and (self._compiled_ready(training)
                                                   or (self._learning_shapes and not training)):
                    stack.enter_context(self._compiled.installed(
                        skip_adapters=training, learn_shapes=self._learning_shapes and not training))
                if self._graphs is not None and graphs:
                    # A graph replays the kernels of the blocks installed at its capture. During a
                    # training the base model's graphs (stages compiled) are replayed as they are:
                    # the training's adapters are off and their weights are no input of the graphs.
                    # A shape without one is captured with the blocks that hold adapters running
                    # plain (recompiling them would take minutes), and kept apart, so that pictures
                    # outside trainings never replay those slower kernels.
                    stack.enter_context(self._graphs.installed(variant="next to a training", reuse=(None,))
                                        if training else self._graphs.installed())
                yield
        finally:
            for name, state in states.items():
                if state is not None:
                    adapters.set_enabled(self._lora_modules[name], state.enabled)
            for sub, mode in modes.items():
                sub.training = mode

    def _compiled_ready(self, training: bool) -> bool:
        """Whether pictures use the compiled code now: that of the warm-up's part that prepares them
        (any shape; next to a training) has run, or compiled code is used from the start."""
        if self._ready is None:
            return True
        if self._compiled is not None and not self._compiled.whole_stages:
            return bool(self._ready)  # blocks only: every part compiles the same blocks
        return (DURING_TRAINING if training else ANY_SHAPE) in self._ready

    def _part_ready(self, name: str) -> None:
        """From now on pictures use `name`'s compiled code; graphs captured without it are dropped, to
        be captured again with it."""
        if self._ready is None or name in self._ready:
            return
        self._ready.add(name)
        if self._graphs is not None:
            self._graphs.unet.clear()
            self._graphs.decode.clear()

    def warm_up_parts(self, counts: tuple[int, ...] = (1, MAX_IMAGES)) -> list[str]:
        """The parts of `warm_up(counts)` that compile, in order (none where nothing compiles): a
        worker's start helpers (trainer.start_helpers) compile all but the first in processes of
        their own, at the same time as it."""
        if self._compiled is None:
            return []
        stages = [ANY_SHAPE, DURING_TRAINING] if self._compiled.whole_stages else []
        return stages + [square_part(count) for count in counts]

    def warm_up(self, counts: tuple[int, ...] = (1, MAX_IMAGES), *,
                on_part: Callable[[str], None] = lambda part: None, parts: Collection[str] | None = None,
                before_part: Callable[[str], None] = lambda part: None,
                on_done: Callable[[str, float], None] = lambda part, seconds: None) -> float:
        """Compile and capture the graphs of square pictures for these counts now, so the first
        requests do not pay for it; returns the seconds spent. Does nothing with neither graphs nor
        compiling. `on_part` hears, in words for whoever waits on the start, each part as it begins:
        a first start takes many minutes, and knowing it moves matters to those waiting.

        These pictures' stages are compiled for their static shapes (unless `static_shapes` is off,
        which saves minutes of a first start). The dynamic-shape code that other pictures run, and
        the blocks that pictures between training steps run, are compiled here too, first, rather
        than in the middle of someone's request or training.

        `parts` (names from `warm_up_parts`; None: all) are the parts to run, for a start helper
        that compiles only its own. `before_part(name)` is called as each begins, after `on_part`:
        the worker waits there for the helper compiling that part, then reads its code back.
        `on_done(name, seconds)` is called as each ends, with its time unrounded (trainer.start_report).
        """
        if self._graphs is None and self._compiled is None:
            return 0.0
        if self._compiled is not None:
            log.info("compiling the UNet and VAE decoder for generation: many minutes the first time, "
                     "far less once inductor's cache holds them")
        started = part_started = time.monotonic()

        def part_begins(name: str, news: str) -> bool:
            """Whether to run the part `name`; if so, `on_part` and `before_part` hear of it and its
            clock starts."""
            nonlocal part_started
            if parts is not None and name not in parts:
                return False
            with self._lock:
                self._part_ready(name)
            on_part(news)
            before_part(name)
            part_started = time.monotonic()
            return True

        def part_done(name: str, what: str) -> None:
            # Each part's share of the start-up, for whoever waits on it or wants to shorten it.
            seconds = time.monotonic() - part_started
            log.info("warm-up: %s in %.1f s", what, seconds)
            on_done(name, seconds)

        if self._compiled is not None and self._compiled.whole_stages:
            # Eager, no graphs: only the compiling is wanted. Not square, and first: dynamo gives equal
            # sizes one symbol, so code traced on a square first would compile again for the first
            # portrait, while code traced on a portrait also serves the squares below.
            width, height = self.image_size("portrait")
            for name, regions, output, what, news in (
                    (ANY_SHAPE, self._compiled.installed(static=False), "pt",
                     "stages and decoder compiled for dynamic shapes", "compiling the model for pictures of any shape"),
                    (DURING_TRAINING, self._compiled.installed(whole_stages=False), "latent",
                     "blocks compiled for pictures during trainings",
                     "compiling the model for pictures drawn during trainings")):
                if not part_begins(name, news):
                    continue
                with self._lock, regions:
                    for count in counts:
                        self._text(prompt="warm-up", num_images_per_prompt=count, num_inference_steps=2,
                                   width=width, height=height, output_type=output)
                part_done(name, what)
        self._learning_shapes = True
        try:
            for count in counts:
                pictures = "one square picture" if count == 1 else f"{count} square pictures"
                if not part_begins(square_part(count), f"getting {pictures} ready"):
                    continue
                self.generate(GenerateRequest(prompt="warm-up", num_images=count, seed=0, steps=2))
                part_done(square_part(count), f"{count} square picture(s) compiled and captured")
        finally:
            self._learning_shapes = False
        elapsed = time.monotonic() - started
        log.info("warmed up generation for %s picture(s) in %.1f s", counts, elapsed)
        return elapsed

    # ---- generation --------------------------------------------------------------------------------
    def _scheduler(self, name: str) -> Any:
        """The sampling scheduler called `name`; a flow-matching model's own, whatever the name."""
        return self._flow_scheduler if self._flow_scheduler is not None else self._schedulers.get(name)

    def img2img_size(self, size: tuple[int, int]) -> dict[str, int]:
        """The picture size an image-to-image call must be told: Flux's draws its default size (1024 px)
        whatever the picture given; SD's follow the picture."""
        return {"width": size[0], "height": size[1]} if self.family.flow_matching else {}

    def _image_pipeline(self) -> DiffusionPipeline:
        if self._image is None:
            components = {k: v for k, v in self._text.components.items()
                          if k in self._image_cls._get_signature_keys(self._image_cls)[0]}
            self._image = self._image_cls(**components, **self._image_options)
            self._image.set_progress_bar_config(disable=True)
        return self._image

    def _init_image(self, data: bytes, size: tuple[int, int]) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise TrainerError("The picture to make variations of could not be read.", "bad_image") from exc
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def _face_pass(self, pixels: np.ndarray, seeds: list[int], request: GenerateRequest, negative: str,
                   handle: str | None, class_word: str | None, on_event: EventSink,
                   should_cancel: Callable[[], bool]) -> np.ndarray:
        """`pixels` with the faces found redrawn at native size (trainer.face_pass), reporting
        `refining_face` progress; the caller holds the lock and has the LoRA merged."""
        crops = face_pass.crops_for(pixels, seeds, self.base_resolution, self.face_detector)
        if not crops:
            return pixels
        started = time.monotonic()
        subject = " ".join(w for w in (handle, class_word) if w)
        prompt = face_pass.face_prompt(subject, prompts.compose_prompt(request.prompt, None, None, request.style),
                                       lambda text: all(prompts.count_tokens(t, text) <= t.model_max_length
                                                        for t in self.tokenizers))
        pipe = self._image_pipeline()
        pipe.scheduler = self._scheduler(request.scheduler)

        def on_step(done: int, total: int) -> None:
            elapsed = time.monotonic() - started
            on_event(events.Progress(done, total, eta_s=elapsed / done * (total - done), stage="refining_face"))
            if should_cancel():
                raise Cancelled()

        how = face_pass.Redraw(prompt, negative or None, request.steps, self.guidance_for(request), self.base_resolution,
                               batch=MAX_IMAGES, size=self.img2img_size((self.base_resolution,) * 2))
        refined = face_pass.redraw(pipe, pixels, crops, how, to_pixels, on_step)
        log.info("redrew %d face(s) in %d picture(s) in %.2f s", len(crops), len({c.index for c in crops}),
                 time.monotonic() - started)
        return refined

    def _settings_texts(self, request: GenerateRequest, prompt: str, negative: str, seeds: list[int],
                        size: tuple[int, int], strength: float | None, adapter_key: str | None,
                        handle: str | None) -> list[str]:
        """Each picture's settings in A1111's text (jobs.png_parameters), for its PNG's `parameters` chunk."""
        lora_name = lora_hash = None
        if adapter_key is not None:
            # As A1111 names the LoRA: after its kohya file, which the trainer names after the handle.
            lora_name, lora_hash = lora_io.safe_file_stem(handle or ""), self._lora_hashes[adapter_key]
        settings = png_parameters.PictureSettings(
            prompt=prompt, negative_prompt=negative, seed=seeds[0], steps=request.steps, guidance=self.guidance_for(request),
            scheduler=png_parameters.FLOW_SAMPLER if self.family.flow_matching else request.scheduler,
            width=size[0], height=size[1], model=self.model_name,
            lora_name=lora_name, lora_hash=lora_hash, strength=strength)
        return [png_parameters.to_text(replace(settings, seed=seed)) for seed in seeds]

    def generate(self, request: GenerateRequest, *, adapter_key: str | None = None,
                 lora_path: Path | None = None, handle: str | None = None, class_word: str | None = None,
                 on_event: EventSink = events.ignore, should_cancel: Callable[[], bool] = lambda: False,
                 init_image: bytes | None = None) -> list[Picture]:
        """Make `request.num_images` pictures, with `adapter_key`'s LoRA or (key None) the base model.

        `lora_path` is read only when the adapter is not resident. `handle` and `class_word` name the
        person in the prompt (see trainer.prompts). With `init_image` (PNG/JPEG bytes) the pictures are
        variations of it. With a LoRA and `request.face_pass`, the faces found are then redrawn with it
        (trainer.face_pass). Reports `progress` events per denoising step and raises Cancelled between
        steps once `should_cancel()` is true; raises PromptTooLong before any work for long prompts.
        """
        with self._lock:
            if should_cancel():
                raise Cancelled()
            prompt, negative = self.prepare_prompt(request, handle, class_word)
            width, height = self.image_size(request.aspect)
            first = request.seed if request.seed is not None else secrets.randbelow(2**31)
            seeds = [first + i for i in range(request.num_images)]
            lora = self._lora_for(adapter_key, lora_path)
            # CPU generators: the starting noise, hence the picture for a seed, is the same on any device.
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            kwargs: dict[str, Any] = {
                "prompt": prompt, "negative_prompt": negative or None, "num_images_per_prompt": len(seeds),
                "num_inference_steps": request.steps, "guidance_scale": self.guidance_for(request),
                "generator": generators, "output_type": "pt",
            }
            strength = None
            if init_image is not None:
                pipe = self._image_pipeline()
                strength = request.strength or DEFAULT_VARIATION_STRENGTH
                kwargs.update(image=self._init_image(init_image, (width, height)), strength=strength,
                              num_inference_steps=img2img_steps(request.steps, strength),
                              **self.img2img_size((width, height)))
            else:
                pipe = self._text
                kwargs.update(width=width, height=height)
            pipe.scheduler = self._scheduler(request.scheduler)
            started = time.monotonic()

            def on_step_end(p: DiffusionPipeline, step: int, _timestep: Any, tensors: dict[str, Any],
                            ) -> dict[str, Any]:
                done, total = step + 1, p.num_timesteps
                elapsed = time.monotonic() - started
                on_event(events.Progress(done, total, eta_s=elapsed / done * (total - done),
                                         stage="generating"))
                if should_cancel():
                    raise Cancelled()
                return tensors

            with self._applied(lora):
                pixels = to_pixels(pipe(**kwargs, callback_on_step_end=on_step_end).images)
                # With the person's LoRA still merged.
                if lora is not None and request.face_pass:
                    pixels = self._face_pass(pixels, seeds, request, negative, handle, class_word,
                                             on_event, should_cancel)
            files = png.encode_rgb(list(pixels), [{png_parameters.KEY: text} for text in self._settings_texts(
                request, prompt, negative, seeds, (width, height), strength, adapter_key, handle)])
            result = [Picture(data, seed) for data, seed in zip(files, seeds, strict=True)]
            log.info("made %d %dx%d picture(s), %s, %d steps, %s, in %.2f s", len(result), width, height,
                     "variation" if init_image is not None else "text to image", request.steps,
                     "with a LoRA" if adapter_key else "base model", time.monotonic() - started)
            return result

    def upscale(self, request: GenerateRequest, image: bytes, *, adapter_key: str | None = None,
                lora_path: Path | None = None, handle: str | None = None, class_word: str | None = None,
                on_event: EventSink = events.ignore, should_cancel: Callable[[], bool] = lambda: False,
                ) -> list[Picture]:
        """`image` (PNG/JPEG bytes) at twice its width and height: enlarged with Lanczos, then redrawn
        by img2img at `request.strength` (default trainer.upscale.DEFAULT_UPSCALE_STRENGTH) with the
        request's prompt and `adapter_key`'s LoRA, from `request.seed` (the picture's own, so an
        upscale is reproducible). Events and cancelling as `generate`'s; see trainer.upscale."""
        with self._lock:
            if should_cancel():
                raise Cancelled()
            prompt, negative = self.prepare_prompt(request, handle, class_word)
            source = upscaling.read_picture(image)
            size = upscaling.upscaled_size(source.size, self.size_multiple)
            seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
            lora = self._lora_for(adapter_key, lora_path)
            pipe = self._image_pipeline()
            pipe.scheduler = self._scheduler(request.scheduler)
            started = time.monotonic()
            strength = request.strength or upscaling.DEFAULT_UPSCALE_STRENGTH
            # No CUDA graphs: a 2x shape's graph would keep four times a picture's activations in the
            # graph pool for a rare request, where a step this large is bound by the GPU anyway.
            with self._applied(lora, graphs=False), upscaling.vae_tiled(pipe.vae):
                images = pipe(prompt=prompt, negative_prompt=negative or None,
                              image=upscaling.enlarged(source, size), **self.img2img_size(size),
                              strength=strength, num_inference_steps=img2img_steps(request.steps, strength),
                              guidance_scale=self.guidance_for(request),
                              generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                              callback_on_step_end=upscaling.step_reporter(on_event, should_cancel)).images
            # The settings of the img2img pass that made it: its size, strength and the picture's seed.
            [data] = png.encode_rgb(list(to_pixels(images)), [{png_parameters.KEY: text} for text in self._settings_texts(
                request, prompt, negative, [seed], size, strength, adapter_key, handle)])
            log.info("upscaled a %dx%d picture to %dx%d, %s, in %.2f s", *source.size, *size,
                     "with a LoRA" if adapter_key else "base model", time.monotonic() - started)
            return [Picture(data, seed)]
