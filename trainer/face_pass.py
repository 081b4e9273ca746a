"""The face pass: faces in a person's picture redrawn, at the model's native size, with their own LoRA.

A DreamBooth LoRA knows a face well, but in a full picture the face often covers a few dozen latent
pixels (the VAE works at 1/8 of the picture's size), too few for the model to draw the person's
likeness. The pass finds the faces in the drawn pictures, cuts a padded square around each, scales
it up to the model's native resolution, redraws it with img2img (strength 0.4: the face keeps its
pose, light and place in the picture, and gains detail) through the same pipeline with the person's
LoRA still merged, and pastes it back through a feathered round mask. Pixels outside the mask
are the picture's own, byte for byte.

Detection: OpenCV's frontal-face Haar cascade (photos.faces), which ships inside the
opencv-python-headless wheel the intake already needs. The wheel has the YuNet detector's code
(`cv2.FaceDetectorYN`) but not its ONNX model, and a better detector that ships its model inside a
package (MediaPipe's BlazeFace, InsightFace) would add a large dependency to every worker. Generated
faces are frontal, lit and sharp more often than selfies, which is what the cascade finds best; a
face it misses is simply left as drawn. The detector is a parameter (`Detector`).

Prompt: diffusers' pipelines read a prompt as plain text (no A1111 "(word:1.3)" weights without an
extra library), so the handle is emphasised the way plain CLIP prompting allows: it is named first,
in a prompt that says what the crop shows, "a close-up of the face of zqjane woman, <prompt>".
CLIP's pooled and per-token features weigh the start of a prompt most, and a close-up crop drawn
from a prompt describing a whole scene tends to grow that scene into the face.

Seeds: each crop's noise comes from a CPU generator seeded from its picture's seed and the face's
place in the picture, so a seed reproduces the whole picture, face pass included.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from photos import faces
from trainer.dataset import encode_latents

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

log = logging.getLogger(__name__)

Box = faces.Box
Detector = Callable[[Image.Image], list[Box]]
"""Finds faces in a picture: (x, y, width, height) boxes in its pixels, largest first."""

STRENGTH = 0.4
"""How far the redraw may move from the drawn face: enough for the LoRA to put the person's features
in, little enough that pose, expression and light stay those of the picture (ADetailer's default)."""

STEP_FRACTION = 0.8
"""The redraw's schedule has this fraction of the request's steps (of which it runs the last 40 %):
a request's step count is set for the whole schedule, whose early, high-noise steps settle the
composition; the low-noise end the redraw runs converges in fewer (the default sampler, DPM-Solver++
2M, is a second-order method). At 25 steps the pass runs 8 UNet steps, about a third of the picture's, which keeps it,
with the crop's VAE encode and decode, near the 40 % of a picture's time it is budgeted."""

MAX_FACES = 2
"""Faces redrawn per picture, the largest: the person is usually the largest face; a crowd's small
faces would each cost a redraw and are not the person anyway."""

MAX_FACE_FRACTION = 0.4
"""A face wider than this fraction of the native resolution is left as drawn: its padded crop would
be scaled up by less than about 1.4x, so the model already drew it with most of the latent pixels a
redraw would give it, and the pass would cost a redraw for little new detail."""

PAD = 1.8
"""Side of the crop as a multiple of the face box: hair, ears and chin in view, so the redraw sees
where the face meets the head, and the feathered edge falls on them rather than on the face."""

FEATHER = 0.12
"""Width of the mask's soft edge as a fraction of the crop's side: wide enough that the redrawn
face's slightly different tones blend into the picture without a visible seam."""

FACE_SUBJECT = "a close-up of the face of"  # no "photo": the style (anime, oil...) follows

SEED_STRIDE = 1_000_003
"""Face k of a picture with seed s is redrawn with seed s + SEED_STRIDE * (k + 1): the pictures of a
request have seeds s, s + 1, ..., so no two crops share their noise, nor share it with a picture."""


MIN_FACE_PX = 24
"""Smallest face looked for, at the detector's 512 px scale: the cascade's own window. The intake
looks only for selfie-sized faces, but here the small faces (a full-length figure's) are the ones
that gain most."""


def detect_faces(image: Image.Image) -> list[Box]:
    """The default detector: the intake's Haar cascade (photos.faces), largest first. Where OpenCV has
    no cascade (an OpenCV 5 installed against requirements.txt) it finds nothing: the pictures are
    then sent without the pass rather than not at all."""
    try:
        return faces.detect_faces(image, image.size, min_face_px=MIN_FACE_PX)
    except RuntimeError as exc:
        _warn_no_detector(str(exc))
        return []


@functools.cache
def _warn_no_detector(reason: str) -> None:
    log.warning("face pass off: %s", reason)


@dataclass(frozen=True)
class Crop:
    """A face to redraw: picture `index`'s square at (`left`, `top`) of side `side`, its `seed`."""

    index: int
    left: int
    top: int
    side: int
    seed: int


def face_seed(picture_seed: int, face: int) -> int:
    """The seed of the `face`-th face redrawn in the picture drawn with `picture_seed`."""
    return picture_seed + SEED_STRIDE * (face + 1)


def crop_around(face: Box, size: tuple[int, int]) -> tuple[int, int, int]:
    """(left, top, side): a square PAD times the face, centred on it, slid (not cut) to stay inside
    a picture of `size`, and never larger than its short side."""
    width, height = size
    x, y, w, h = face
    side = min(width, height, max(8, math.ceil(PAD * max(w, h))))
    left = min(max(0, round(x + w / 2 - side / 2)), width - side)
    top = min(max(0, round(y + h / 2 - side / 2)), height - side)
    return left, top, side


def crops_for(pictures: np.ndarray, seeds: Sequence[int], native: int, detector: Detector) -> list[Crop]:
    """The faces to redraw in `pictures` ((N, H, W, 3) bytes): per picture, its largest MAX_FACES
    faces below MAX_FACE_FRACTION of `native`."""
    crops = []
    for index, (picture, seed) in enumerate(zip(pictures, seeds, strict=True)):
        image = Image.fromarray(picture)
        found = detector(image)
        boxes = [box for box in found if max(box[2], box[3]) <= MAX_FACE_FRACTION * native]
        log.debug("picture %d: %d face(s) found, %d small enough to redraw", index, len(found), len(boxes))
        for face, box in enumerate(boxes[:MAX_FACES]):
            crops.append(Crop(index, *crop_around(box, image.size), seed=face_seed(seed, face)))
    return crops


def feathered_mask(side: int) -> np.ndarray:
    """A (side, side) float32 mask: 1 in a disc, falling smoothly (smoothstep over FEATHER of the
    side) to exactly 0 at the square's edge, so the crop's border pixels are never touched."""
    centre = (side - 1) / 2
    outer = side / 2 - 0.5  # the distance from the centre to the edge pixels' centres
    feather = max(1.0, FEATHER * side)
    y, x = np.ogrid[:side, :side]
    distance = np.sqrt((x - centre) ** 2 + (y - centre) ** 2)
    ramp = np.clip((outer - distance) / feather, 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


def paste(picture: np.ndarray, redrawn: np.ndarray, crop: Crop) -> None:
    """Blend `redrawn` ((side, side, 3) bytes) into `picture` in place at `crop`, through the
    feathered mask; where the mask is 0 the picture's bytes are kept as they are."""
    mask = feathered_mask(crop.side)[..., None]
    region = picture[crop.top:crop.top + crop.side, crop.left:crop.left + crop.side]
    blended = np.rint(region * (1 - mask) + redrawn * mask).astype(np.uint8)
    region[...] = np.where(mask > 0, blended, region)


def face_prompt(subject: str, prompt: str, fits: Callable[[str], bool]) -> str:
    """"a close-up of the face of <subject>, <prompt>", or without `prompt` where that would not
    fit the text encoder (`fits`): the person matters more than the scene here."""
    lead = f"{FACE_SUBJECT} {subject}".strip()
    full = f"{lead}, {prompt}" if prompt else lead
    return full if fits(full) else lead


def encode(vae: AutoencoderKL, images: Sequence[np.ndarray]) -> torch.Tensor:
    """The crops ((side, side, 3) bytes) as the latents img2img starts from, scaled as the pipeline
    scales its own: the mean of the VAE's distribution, in one batch.

    Encoding here rather than in the pipeline: SDXL's img2img casts a VAE with `force_upcast` to
    float32 and back around its encode whatever its dtype, which moves the decoder's weights from
    where its CUDA graphs read them (trainer.graphs would capture them again on every pass); here
    only an fp16 VAE is upcast, as it must be (trainer.dataset.encode_latents). The pipeline also
    encodes one crop at a time, sampling each with its generator; the mean serves a 0.4 redraw as well.
    """
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = encode_latents(vae, pixels, batch_size=len(images)).mean.to(vae.device)
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = (latents - torch.tensor(mean).view(shape).to(latents)) / torch.tensor(std).view(shape).to(latents)
    # Flux's VAE centres its latents too (FluxImg2ImgPipeline._encode_vae_image).
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * config.scaling_factor


@dataclass(frozen=True)
class Redraw:
    """How to redraw: the prompts, the request's steps, guidance and the model's native size."""

    prompt: str
    negative: str | None
    steps: int
    guidance: float
    native: int
    batch: int = 4  # crops per img2img call: the batch sizes the pictures' own graphs already have
    # What the image-to-image call must also be told of the size (GenerationEngine.img2img_size):
    # Flux's draws its default 1024 px unless told; SD's follow the crop.
    size: Mapping[str, int] = field(default_factory=dict)


def redraw(pipe: DiffusionPipeline, pictures: np.ndarray, crops: Sequence[Crop], how: Redraw,
           to_pixels: Callable[[torch.Tensor], np.ndarray],
           on_step: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
    """`pictures` with every crop redrawn by `pipe` (an img2img pipeline, its scheduler set) and
    pasted back; a new array, the input is left unchanged. `on_step(done, total)` hears each
    denoising step over all crops (it may raise to cancel)."""
    out = pictures.copy()
    if not crops:
        return out
    # At least one denoising step however few the request has: img2img runs int(steps * strength).
    steps = max(math.ceil(how.steps * STEP_FRACTION), math.ceil(1 / STRENGTH))
    calls, done = math.ceil(len(crops) / how.batch), 0
    for first in range(0, len(crops), how.batch):
        chunk = crops[first:first + how.batch]
        images = [np.asarray(Image.fromarray(pictures[c.index, c.top:c.top + c.side, c.left:c.left + c.side])
                             .resize((how.native, how.native), Image.Resampling.LANCZOS)) for c in chunk]

        def on_step_end(p: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            on_step(done, p.num_timesteps * calls)
            return tensors

        result = pipe(prompt=[how.prompt] * len(chunk),
                      negative_prompt=[how.negative] * len(chunk) if how.negative else None,
                      image=encode(pipe.vae, images), strength=STRENGTH, num_inference_steps=steps, guidance_scale=how.guidance,
                      generator=[torch.Generator("cpu").manual_seed(c.seed) for c in chunk], output_type="pt",
                      callback_on_step_end=on_step_end,
                      **how.size)
        for crop, face in zip(chunk, to_pixels(result.images), strict=True):
            back = np.asarray(Image.fromarray(face).resize((crop.side, crop.side), Image.Resampling.LANCZOS))
            paste(out[crop.index], back, crop)
    return out
