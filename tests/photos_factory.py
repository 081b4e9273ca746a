"""Synthetic photos for every test, generated in code (nothing is downloaded or stored).

Faces are drawn: a skin-toned oval with hair, eyes, brows, nose shadow and mouth is enough for
OpenCV's frontal-face Haar cascade, which keys on the dark eye band over lighter cheeks. Photos
get mild sensor-like noise so that "sharp" means what it means for a camera photo.

- `portrait`, `face_image`, `face_jpeg`, `selfie`: photos whose faces intake finds.
- `training_photos`: small face-like pictures for trainings on the tiny model.
- `colour_fields`: smooth random colour fields, no face: plausible input for a VAE or an encoder.
- `encode`: any of them as the bytes of an upload.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKY = (118, 150, 182)


def draw_face(draw: ImageDraw.ImageDraw, cx: float, cy: float, width: float) -> None:
    """A frontal face `width` pixels wide (1.3x as tall) centred on (cx, cy)."""
    w, h = width, width * 1.3
    draw.ellipse([cx - w * 0.56, cy - h * 0.62, cx + w * 0.56, cy + h * 0.2], fill=(60, 40, 30))
    draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=(224, 172, 140))
    ey = cy - h * 0.08
    for side in (-1, 1):
        ex = cx + side * w * 0.2
        draw.ellipse([ex - w * 0.11, ey - h * 0.035, ex + w * 0.11, ey + h * 0.035], fill=(250, 250, 250))
        draw.ellipse([ex - w * 0.05, ey - h * 0.035, ex + w * 0.05, ey + h * 0.035], fill=(40, 25, 20))
        draw.rectangle([ex - w * 0.13, ey - h * 0.11, ex + w * 0.13, ey - h * 0.08], fill=(70, 45, 35))
    draw.polygon([(cx, ey), (cx - w * 0.07, cy + h * 0.12), (cx + w * 0.07, cy + h * 0.12)], fill=(190, 140, 110))
    draw.ellipse([cx - w * 0.15, cy + h * 0.2, cx + w * 0.15, cy + h * 0.27], fill=(150, 60, 60))


def add_noise(img: Image.Image, sigma: float = 8.0, seed: int = 0) -> Image.Image:
    """Gaussian noise per channel, like a camera sensor's."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(img, dtype=np.float32)
    noisy = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(sigma)
    return Image.fromarray(np.clip(noisy, 0, 255, out=noisy).astype(np.uint8), mode=img.mode)


def portrait(
    size: tuple[int, int] = (800, 1000),
    faces: tuple[tuple[float, float, float], ...] = ((0.5, 0.45, 0.4),),
    background: tuple[int, int, int] = SKY,
    light: float = 0.35,
    seed: int = 0,
) -> Image.Image:
    """A photo with drawn faces; each face is (centre x, centre y, width) as fractions of the width/height/width.

    `light` is the brightness difference between the left and right edges (negative: lit from the
    right). Side light gives the picture the broad, asymmetric shading that real photos have.
    """
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for fx, fy, fw in faces:
        draw_face(draw, fx * size[0], fy * size[1], fw * size[0])
    # soften the drawn edges a little, as a lens does
    img = img.filter(ImageFilter.BoxBlur(1))
    ramp = np.linspace(1 + light / 2, 1 - light / 2, size[0], dtype=np.float32)[None, :, None]
    lit = Image.fromarray((np.asarray(img, dtype=np.float32) * ramp).clip(0, 255).astype(np.uint8), mode="RGB")
    return add_noise(lit, seed=seed)


@functools.cache
def face_image() -> Image.Image:
    """One clear, sharp, well-framed selfie."""
    return portrait()


@functools.cache
def face_jpeg() -> bytes:
    """`face_image` as a camera's JPEG."""
    return encode(portrait(), "JPEG", quality=95)


def selfie(index: int, size: tuple[int, int] = (640, 800)) -> bytes:
    """A distinct selfie as a JPEG: face position, size, light and background differ per index, so
    that intake keeps each (no near-duplicates) and finds one face in it."""
    backgrounds = [(118, 150, 182), (90, 130, 90), (170, 120, 160), (200, 190, 120), (80, 80, 110),
                   (150, 150, 150), (60, 120, 140), (180, 100, 90)]
    fx = 0.38 + 0.08 * (index % 4)
    fy = 0.4 + 0.05 * (index % 3)
    width = 0.34 + 0.04 * (index % 3)
    image = portrait(size, ((fx, fy, width),), background=backgrounds[index % len(backgrounds)],
                     light=0.5 - 0.25 * (index % 5), seed=index)
    return encode(image, "JPEG", quality=92)


def training_photos(count: int = 5, size: int = 64) -> list[Image.Image]:
    """A face-like blob on coloured backgrounds: enough structure for the VAE, different per photo."""
    rng = np.random.default_rng(0)
    photos = []
    for i in range(count):
        a = np.full((size + 16, size, 3), (30 * i, 60, 200 - 30 * i), np.uint8)
        a[20:60, 16:48] = (210, 160, 120)
        a = (a + rng.integers(0, 25, a.shape)).clip(0, 255).astype(np.uint8)
        photos.append(Image.fromarray(a))
    return photos


def colour_fields(count: int, size: int = 512, cells: int = 8, seed: int = 0) -> list[Image.Image]:
    """Random `cells` x `cells` colours blown up smoothly to `size` px squares: no face, distinct
    from one another, and smooth as photos are (a PNG encoder or a VAE sees photo-like input)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
            .resize((size, size), Image.Resampling.BICUBIC) for _ in range(count)]


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """The bytes of `img` saved as `fmt` (HEIF through pillow-heif)."""
    buffer = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif  # here: the GPU tests' machines may lack it (tests/test_collection.py)

        pillow_heif.from_pillow(img).save(buffer, quality=90)
    else:
        img.save(buffer, fmt, **params)
    return buffer.getvalue()
