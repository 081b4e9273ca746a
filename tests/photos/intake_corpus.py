"""A corpus of good and broken uploads for photo intake, generated in code (nothing is downloaded).

Faces and the photo helpers come from tests/photos_factory.py; the pictures without a face, the odd
formats and the broken files are made here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from photos.intake import IntakeLimits
from tests.photos import bombs
from tests.photos_factory import SKY, add_noise, encode, face_image, face_jpeg, portrait

# --- pictures without a face ---------------------------------------------------------------------


def landscape(size: tuple[int, int] = (1200, 800), seed: int = 1) -> Image.Image:
    """Sky, two mountain ridges and a meadow: a photo with structure but no face."""
    width, height = size
    img = Image.new("RGB", size, SKY)
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    for shade, base in (((90, 100, 120), 0.45), ((60, 80, 70), 0.6)):
        xs = np.linspace(0, width, 12)
        ys = base * height + rng.uniform(-0.12, 0.12, xs.size) * height
        draw.polygon([(0, height), *zip(xs.tolist(), ys.tolist(), strict=True), (width, height)], fill=shade)
    draw.rectangle([0, int(0.8 * height), width, height], fill=(70, 130, 60))
    return add_noise(img, sigma=10.0, seed=seed)


def noise_image(size: tuple[int, int] = (600, 600), seed: int = 2) -> Image.Image:
    """Uniform RGB noise: nothing a face detector should find."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def quadrants(size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Four coloured quadrants (red, green / blue, yellow) to see where rotation puts each corner."""
    width, height = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width // 2, height // 2], fill=(220, 30, 30))
    draw.rectangle([width // 2, 0, width, height // 2], fill=(30, 200, 30))
    draw.rectangle([0, height // 2, width // 2, height], fill=(30, 30, 220))
    draw.rectangle([width // 2, height // 2, width, height], fill=(230, 220, 30))
    return add_noise(img, sigma=12.0)


def textured(mode: str, colour: tuple[int, ...], size: tuple[int, int] = (400, 400), seed: int = 3) -> Image.Image:
    """A flat `colour` in `mode` with noise on every band (so it is not flagged blurry)."""
    rng = np.random.default_rng(seed)
    bands = len(colour)
    pixels = np.asarray(colour, dtype=np.float32) + rng.normal(0.0, 12.0, (size[1], size[0], bands))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode=mode)


# --- encoding ------------------------------------------------------------------------------------


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    """`img`'s pixels stored as they are, with an EXIF tag asking viewers to rotate them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=92, exif=exif)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, rows: Callable[[], bytes]) -> bytes:
    """A PNG written by hand: for headers and sample formats that Pillow will not write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows(), 6))
        + _png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but holds no pixel data at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def decompression_bomb_png(side: int = 8000) -> bytes:
    """A real, valid grayscale PNG of side x side black pixels that compresses to about 60 kB."""
    row = b"\x00" * (side + 1)
    return png_from_rows(side, side, 8, 0, lambda: row * side)


def gray16_gradient() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG (Pillow mode I;16): a left-to-right ramp 0..65535 with noise."""
    rng = np.random.default_rng(4)
    ramp = np.tile(np.linspace(0, 65535, 512), (512, 1)) + rng.normal(0, 2500, (512, 512))
    samples = np.clip(ramp, 0, 65535).astype(np.uint16)
    return encode(Image.fromarray(samples), "PNG"), samples


def rgb16_png() -> bytes:
    """A 16-bit-per-channel RGB PNG: orange with noise, written by hand (Pillow cannot)."""
    rng = np.random.default_rng(5)
    pixels = np.array([60000, 30000, 5000], dtype=np.float64) + rng.normal(0, 3000, (400, 400, 3))
    samples = np.clip(pixels, 0, 65535).astype(">u2")
    return png_from_rows(400, 400, 16, 2, lambda: b"".join(b"\x00" + row.tobytes() for row in samples))


def rgb_swapping_icc() -> bytes:
    """An ICC v2 RGB display profile whose red and green primaries are sRGB's green and red.

    A pixel stored as pure red under this profile *means* green, so converting it to sRGB must
    turn it green: proof that an embedded profile is honoured and not ignored.
    """

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \x00\x00\x00\x00" + s15(x) + s15(y) + s15(z)

    gamma = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, 0x0233) + b"\x00\x00"
    text = b"swapped red and green\x00"
    desc = b"desc\x00\x00\x00\x00" + struct.pack(">I", len(text)) + text + b"\x00" * (4 + 4 + 2 + 1 + 67)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.3851, 0.7169, 0.0971)),  # sRGB's green primary (D50)
        (b"gXYZ", xyz(0.4360, 0.2225, 0.0139)),  # sRGB's red primary (D50)
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", gamma),
        (b"gTRC", gamma),
        (b"bTRC", gamma),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\x00" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\x00" * 12
        + b"acsp"
        + b"\x00" * 28
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\x00" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


# --- photos for particular cases -----------------------------------------------------------------


def animated(fmt: str) -> bytes:
    """Three frames of a moving face in `fmt` (GIF, WEBP or PNG for APNG)."""
    frames = [portrait((320, 320), ((0.4 + 0.1 * i, 0.45, 0.4),), seed=i) for i in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def mpo_jpeg() -> bytes:
    """A phone-style JPEG carrying a second picture (MPO), as depth or stereo cameras write them."""
    return encode(face_image(), "MPO", save_all=True, append_images=[landscape((800, 1000))], quality=90)


def palette_with_hole() -> Image.Image:
    """A palette image whose left half is the transparent index 0, right half noisy colours."""
    rng = np.random.default_rng(7)
    indices = rng.integers(1, 256, (400, 400), dtype=np.uint8)
    indices[:, :200] = 0
    img = Image.fromarray(indices, mode="P")
    palette = rng.integers(0, 256, 768, dtype=np.uint8)
    palette[:3] = (0, 0, 0)
    img.putpalette(palette.tobytes())
    img.info["transparency"] = 0
    return img


def half_transparent(mode: str, colour: tuple[int, ...]) -> Image.Image:
    """`colour` with noise in `mode` (LA or RGBA), fully transparent on the left half."""
    img = textured(mode, colour)
    pixels = np.array(img)
    pixels[:, :200, -1] = 0
    return Image.fromarray(pixels, mode=mode)


# --- the corpus ----------------------------------------------------------------------------------

SMALL = IntakeLimits(max_bytes=200_000)
FEW_PIXELS = IntakeLimits(max_pixels=500_000)
LOW_DECODE_BUDGET = IntakeLimits(max_decode_bytes=500_000)


@dataclass(frozen=True)
class Case:
    """One upload and its exact outcome: an IntakeError code, or the flags of a kept photo."""

    name: str
    make: Callable[[], bytes]
    expect: str | tuple[str, ...]
    limits: IntakeLimits = field(default_factory=IntakeLimits)
    source_format: str | None = None


CASES: list[Case] = [
    # kept
    Case("face_jpeg", face_jpeg, (), source_format="JPEG"),
    Case("face_png", lambda: encode(face_image(), "PNG"), (), source_format="PNG"),
    Case("face_webp_still", lambda: encode(face_image(), "WEBP", quality=90), (), source_format="WEBP"),
    Case("face_heic", lambda: encode(portrait((400, 500)), "HEIF"), (), source_format="HEIF"),
    Case("face_mpo_is_jpeg", mpo_jpeg, (), source_format="JPEG"),
    Case("exif_orientation_6", lambda: jpeg_with_orientation(quadrants(), 6), ("no_face",), source_format="JPEG"),
    Case("exif_orientation_3", lambda: jpeg_with_orientation(quadrants(), 3), ("no_face",), source_format="JPEG"),
    Case("cmyk_jpeg", lambda: encode(textured("CMYK", (200, 20, 10, 10)), "JPEG", quality=95), ("no_face",)),
    Case("palette_png_transparent", lambda: encode(palette_with_hole(), "PNG"), ("no_face",), source_format="PNG"),
    Case("gray16_png", lambda: gray16_gradient()[0], ("no_face",), source_format="PNG"),
    Case("rgb16_png", rgb16_png, ("no_face",), source_format="PNG"),
    Case("grayscale_l_jpeg", lambda: encode(textured("L", (128,)), "JPEG", quality=95), ("no_face",)),
    Case("la_png", lambda: encode(half_transparent("LA", (90, 255)), "PNG"), ("no_face",)),
    Case("rgba_png", lambda: encode(half_transparent("RGBA", (20, 90, 200, 255)), "PNG"), ("no_face",)),
    Case("icc_tagged_png", lambda: encode(textured("RGB", (230, 20, 20)), "PNG", icc_profile=rgb_swapping_icc()),
         ("no_face",)),
    Case("landscape_no_face", lambda: encode(landscape(), "JPEG", quality=92), ("no_face",)),
    Case("noise_no_face", lambda: encode(noise_image(), "PNG"), ("no_face",)),
    Case("blurry_face", lambda: encode(face_image().filter(ImageFilter.GaussianBlur(4)), "JPEG", quality=92),
         ("blurry",)),
    Case("blurry_landscape", lambda: encode(landscape().filter(ImageFilter.GaussianBlur(5)), "JPEG", quality=92),
         ("no_face", "blurry")),
    Case("two_faces", lambda: encode(portrait((1200, 800), ((0.3, 0.45, 0.2), (0.7, 0.45, 0.2))), "JPEG"),
         ("several_faces",)),
    Case("small_face", lambda: encode(portrait((1600, 1200), ((0.3, 0.4, 0.07),)), "JPEG", quality=95),
         ("small_face",)),
    Case("face_in_corner", lambda: encode(portrait((1600, 900), ((0.15, 0.25, 0.1),)), "JPEG", quality=95), ()),
    # refused
    Case("zero_bytes", lambda: b"", "empty"),
    Case("random_bytes", lambda: np.random.default_rng(6).bytes(4096), "not_image"),
    Case("html_named_jpg", lambda: b"<!DOCTYPE html><html><body><img src='selfie.jpg'></body></html>", "not_image"),
    Case("text_file", lambda: b"just some notes\n" * 50, "not_image"),
    Case("truncated_jpeg", lambda: face_jpeg()[: len(face_jpeg()) * 6 // 10], "corrupt"),
    Case("jpeg_cut_in_header", lambda: face_jpeg()[:40], "corrupt"),
    Case("truncated_png", lambda: encode(noise_image(), "PNG")[:20_000], "corrupt"),
    Case("truncated_webp", lambda: encode(face_image(), "WEBP")[:3000], "corrupt"),
    Case("tiny_100", lambda: encode(noise_image((100, 100)), "PNG"), "too_small"),
    Case("thin_1000x200", lambda: encode(noise_image((1000, 200)), "JPEG"), "too_small"),
    Case("png_header_100000_square", lambda: png_header_only(100_000, 100_000), "too_many_pixels"),
    Case("decompression_bomb", decompression_bomb_png, "too_many_pixels"),
    Case("over_lowered_pixel_limit", lambda: encode(noise_image((1000, 1000)), "PNG"), "too_many_pixels",
         limits=FEW_PIXELS),
    Case("over_lowered_decode_budget", lambda: gray16_gradient()[0], "too_costly", limits=LOW_DECODE_BUDGET),
    Case("over_lowered_byte_limit", lambda: encode(noise_image((800, 800)), "JPEG", quality=95), "too_large",
         limits=SMALL),
    Case("animated_gif", lambda: animated("GIF"), "animated"),
    Case("animated_webp", lambda: animated("WEBP"), "animated"),
    Case("animated_png", lambda: animated("PNG"), "animated"),
    Case("static_gif", lambda: encode(face_image(), "GIF"), "unsupported_format"),
    Case("bmp", lambda: encode(face_image(), "BMP"), "unsupported_format"),
    Case("tiff", lambda: encode(face_image(), "TIFF"), "unsupported_format"),
    Case("avif", lambda: encode(noise_image((300, 300)), "AVIF"), "unsupported_format"),
]

BOMBS: list[Case] = [
    # kept: a 50 MP 16-bit PNG is a photo, it just must not cost 1.7 GB (issue #27, F1)
    Case("bomb_gray16_png_7071", bombs.gray16_png, ("no_face", "blurry"), source_format="PNG"),
    # refused from the header: libwebp would hold ~800 MB of copies (F1)
    Case("bomb_lossless_webp_7000", bombs.lossless_webp, "too_costly"),
    # refused from the marker stream, before libjpeg or Pillow parse it (F2)
    Case("bomb_jpeg_10000_scans", bombs.scan_bomb, "corrupt"),
    Case("bomb_jpeg_8mib_of_app1", bombs.app1_bomb, "corrupt"),
    # cut short (F8): plain, and closed with an end marker, which libjpeg decodes with a grey or
    # blurred lower part
    Case("bomb_jpeg_cut", lambda: bombs.cut(face_jpeg()), "corrupt"),
    Case("bomb_jpeg_cut_with_end_marker", lambda: bombs.cut_with_end_marker(face_jpeg()), "corrupt"),
    Case("bomb_progressive_jpeg_cut_with_end_marker",
         lambda: bombs.cut_with_end_marker(bombs.progressive_selfie(), 0.3), "corrupt"),
]
"""The hostile uploads of tests/photos/bombs.py: part of the corpus, and what the intake pool is
tested against (tests/photos/test_sandbox.py)."""

CASES += BOMBS
