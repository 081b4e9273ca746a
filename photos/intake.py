"""Photo intake: turn one uploaded selfie into the 512x512 sRGB PNG that training uses, or say why not.

Choices a person will notice:
- Accepted: JPEG, PNG, WebP and HEIC/HEIF, recognised from the bytes (never from the file name
  or the declared content type). A phone JPEG that carries extra pictures (MPO: depth maps,
  previews) is a JPEG; its first picture is used. A HEIF file holding several pictures gives
  its primary picture, as a phone's gallery shows it.
- Animated GIF, animated WebP and animated PNG are refused as 'animated' ("send a still photo").
- GIF is refused even when still: it holds 256 colours, which bands skin tones and teaches the
  model dithering. BMP, TIFF, AVIF, JPEG 2000, JPEG XL, PSD and ICO are refused naming what is
  accepted; anything else is 'not_image'.
- Photos are checked before decoding (byte size, pixel count from the header, animation), so a
  decompression bomb is refused without allocating its pixels. Truncated files are refused as
  'corrupt': Pillow's LOAD_TRUNCATED_IMAGES is left off, so a half photo is never kept.
- Photos without one clear face are kept with a warning (flags): the person decides.

`normalise_photo` is pure: bytes in, a `NormalisedPhoto` or an `IntakeError` out. It writes no
files, so there is never a partial file to clean up; the storage layer stores the result.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from photos import faces, imagehash

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
ACCEPTED_NAMES = "JPEG, PNG, WebP or HEIC"

SMALL_FACE_AREA = 0.02
"""A face box under 2% of the photo's area is a face far from the camera: at 512x512 it would
be about 70 pixels wide, too few for the model to learn a likeness from."""

BLUR_THRESHOLD = 40.0
"""Laplacian variance of the 512x512 grayscale result below which a photo is flagged blurry.
Calibrated on the synthetic corpus: sharp photos (faces, landscape, noise-textured colour
fields, from 800x1000 to 4000x3000) measure 100-950; the same results blurred by a Gaussian of
just 1 output pixel measure 7-17, and of 2 pixels under 4. 40 is near the geometric middle of
17 and 100, so a smooth but sharp close-up is not called blurry, while a visibly soft one is."""

WHITE = (255, 255, 255)

IntakeCode = Literal[
    "empty",
    "too_large",
    "not_image",
    "unsupported_format",
    "corrupt",
    "too_many_pixels",
    "animated",
    "too_small",
    "duplicate",
    "near_duplicate",
]

WARNINGS: dict[str, str] = {
    "no_face": (
        "I couldn't find a face in this photo, so I cropped its centre. It's kept, "
        "but clear photos of your face work best."
    ),
    "several_faces": (
        "This photo seems to show more than one face, so I cropped its centre. It's kept, "
        "but photos of just you work best."
    ),
    "small_face": (
        "Your face is quite small in this photo. It's kept, but closer shots where your face "
        "fills more of the frame work best."
    ),
    "blurry": "This photo looks blurry. It's kept, but sharp photos give a better likeness.",
}
"""One sentence per flag, in the order flags are reported."""


@dataclass(frozen=True)
class IntakeLimits:
    """What intake accepts. The defaults suit phone selfies; tests lower them."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 256
    out_size: int = 512
    near_duplicate_distance: int = 6
    """Largest Hamming distance between 64-bit pHashes that counts as the same photo. In the
    synthetic corpus, a photo re-encoded (JPEG quality 60, WebP quality 70), resized by 10% or
    brightened by 10% moved 0-10 bits (median 2, 41 of 45 within 6); photos with another framing,
    face size, background or lighting differed by 12 or more. 6 catches nearly every re-send
    and refuses no distinct photo: wrongly refusing a new photo is worse than keeping a near copy.
    (Only the same shot with a recoloured background came within 6: that is a re-send too.)"""


DEFAULT_LIMITS = IntakeLimits()


class IntakeError(Exception):
    """A photo that is not kept: `code` is for programs, `message` is what the person reads."""

    def __init__(self, code: IntakeCode, message: str) -> None:
        super().__init__(code, message)  # both in args, so the error survives pickling to another process
        self.code: IntakeCode = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"IntakeError({self.code!r}, {self.message!r})"


@dataclass(frozen=True)
class NormalisedPhoto:
    """The kept form of one photo, plus what intake learned about it."""

    png: bytes
    sha256: str
    phash: int
    source_format: str
    width: int
    height: int
    face_box: tuple[int, int, int, int] | None
    flags: tuple[str, ...]
    warnings: tuple[str, ...]


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two perceptual hashes."""
    return imagehash.hamming(a, b)


def normalise_photo(data: bytes, limits: IntakeLimits = DEFAULT_LIMITS) -> NormalisedPhoto:
    """Validate an upload and return its normalised form; raises `IntakeError` for anything refused."""
    if not data:
        raise IntakeError("empty", "That file is empty. Please send the photo again.")
    if len(data) > limits.max_bytes:
        raise IntakeError(
            "too_large",
            f"That file is {_megabytes(len(data))}, over the {_megabytes(limits.max_bytes)} limit. "
            "Please send a smaller copy of the photo.",
        )
    kind = sniff_format(data)
    if kind is None:
        raise IntakeError(
            "not_image", f"That file doesn't look like a photo. Please send a {ACCEPTED_NAMES} picture."
        )
    if kind not in ACCEPTED_FORMATS:
        if kind == "GIF" and _gif_is_animated(data):
            raise _animated()
        raise IntakeError(
            "unsupported_format",
            f"{FORMAT_NAMES.get(kind, kind)} files aren't supported. Please send the photo as {ACCEPTED_NAMES}.",
        )
    if kind == "HEIF":
        _register_heif()

    work, size = _decode(data, kind, limits)
    rgb = to_srgb(work)
    return _frame(rgb, size, kind, limits)


def check_duplicates(
    photo: NormalisedPhoto,
    existing: Iterable[tuple[str, int]],
    limits: IntakeLimits = DEFAULT_LIMITS,
) -> None:
    """Refuse `photo` if it is the same as, or nearly the same as, one of `existing` (sha256, phash).

    An exact match wins over a near one, whatever the order of `existing`.
    """
    near = False
    for sha256, phash in existing:
        if sha256 == photo.sha256:
            raise IntakeError(
                "duplicate", "You've already sent this photo; it's kept already, so there's nothing more to do."
            )
        near = near or hamming(phash, photo.phash) <= limits.near_duplicate_distance
    if near:
        raise IntakeError(
            "near_duplicate",
            "This looks almost the same as a photo you've already sent, so I didn't keep it again. "
            "Photos with other angles, expressions, lighting or places help your avatar more.",
        )


# --- recognising formats -------------------------------------------------------------------------

FORMAT_NAMES = {
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
    "ICO": "ICO",
    "PSD": "Photoshop (PSD)",
    "AVIF": "AVIF",
    "JPEG2000": "JPEG 2000",
    "JXL": "JPEG XL",
}

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


def sniff_format(data: bytes) -> str | None:
    """Name the image format from its magic number: one of ACCEPTED_FORMATS, a FORMAT_NAMES key, or None."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return _iso_brand(data)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x01\x00") and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ICO"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JXL"
    return None


def _iso_brand(data: bytes) -> str | None:
    """HEIF or AVIF from an ISO base media 'ftyp' box (major and compatible brands)."""
    box_size = int.from_bytes(data[0:4], "big")
    end = min(max(box_size, 16), len(data), 256)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS and not brands & (_HEIF_BRANDS - {b"mif1", b"msf1"}):
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    """Teach Pillow to open HEIF, once, on the first HEIF upload (the plugin loads libheif)."""
    global _heif_registered
    with _heif_lock:
        if not _heif_registered:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_registered = True


# --- decoding ------------------------------------------------------------------------------------


def _animated() -> IntakeError:
    return IntakeError("animated", "That's an animated image. Please send a still photo instead.")


def _gif_is_animated(data: bytes) -> bool:
    """Whether a GIF has a second frame; a broken GIF counts as still (it is refused either way)."""
    try:
        with Image.open(io.BytesIO(data), formats=["GIF"]) as gif:
            return bool(getattr(gif, "is_animated", False))
    except Exception:  # any decoder failure only means "not known to be animated"
        return False


def _too_many_pixels(limits: IntakeLimits, size: tuple[int, int] | None) -> IntakeError:
    megapixels = limits.max_pixels / 1_000_000
    dims = f" ({size[0]}×{size[1]})" if size else ""
    return IntakeError(
        "too_many_pixels",
        f"That image has too many pixels{dims}; the most I can take is {megapixels:g} megapixels. "
        "Please send a smaller copy of the photo.",
    )


def _too_small(size: tuple[int, int], limits: IntakeLimits) -> IntakeError:
    return IntakeError(
        "too_small",
        f"That photo is only {size[0]}×{size[1]} pixels. Photos need at least {limits.min_side} pixels "
        "on each side; please send the original, full-size photo.",
    )


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """`size` as shown: EXIF orientations 5-8 turn the picture a quarter."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _corrupt() -> IntakeError:
    return IntakeError(
        "corrupt",
        "I couldn't read that photo: the file seems damaged or incomplete. Please try sending it again.",
    )


def _decode(data: bytes, kind: str, limits: IntakeLimits) -> tuple[Image.Image, tuple[int, int]]:
    """Decode just enough pixels, upright. Returns the image and the original size after orientation.

    Header checks come first: Image.open only parses the header, so the pixel count, the frame
    count and the short side are known before any pixel is allocated. Every failure of the decoder on these
    untrusted bytes (Pillow raises OSError, SyntaxError, ValueError, struct.error and more) is
    'corrupt'; nothing else escapes.
    """
    formats = ["JPEG", "MPO"] if kind == "JPEG" else [kind]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        raise _too_many_pixels(limits, None) from None
    except Exception as exc:  # untrusted bytes: see docstring
        logger.info("unreadable %s upload (%s)", kind, type(exc).__name__)
        raise _corrupt() from None
    with img:
        header_size = img.size
        if header_size[0] * header_size[1] > limits.max_pixels:
            raise _too_many_pixels(limits, header_size)
        if img.format in ("PNG", "WEBP") and getattr(img, "is_animated", False):
            raise _animated()
        if min(header_size) < limits.min_side:
            try:
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception:  # a broken EXIF block only costs the order of the numbers
                orientation = 1
            raise _too_small(_upright(header_size, orientation), limits)
        if img.format in ("JPEG", "MPO"):
            _draft(img, limits)
        try:
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            upright = ImageOps.exif_transpose(img)
        except Image.DecompressionBombError:
            raise _too_many_pixels(limits, header_size) from None
        except Exception as exc:  # untrusted bytes: see docstring
            logger.info("undecodable %s upload (%s)", kind, type(exc).__name__)
            raise _corrupt() from None
    return upright, _upright(header_size, orientation)


def _draft(img: Image.Image, limits: IntakeLimits) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the output cannot need the full size.

    The scale is chosen so that both framings stay at least `out_size` decoded pixels wide: the
    centre square (the short side) and the tightest crop around a face that is not small
    (CROP_FACTOR x the side of a face of SMALL_FACE_AREA). A 12 MP phone photo decodes at half
    size, which is most of the speed-up, and only a flagged small face is ever upscaled.
    """
    width, height = img.size
    tightest_face_crop = faces.CROP_FACTOR * math.sqrt(SMALL_FACE_AREA * width * height)
    scale = int(min(min(width, height), tightest_face_crop) // limits.out_size)
    if scale >= 2:
        img.draft(None, (width // min(scale, 8), height // min(scale, 8)))


# --- colour --------------------------------------------------------------------------------------

def to_srgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit sRGB RGB; transparency is composited on white.

    16-bit and 32-bit samples are scaled into 0-255 (Pillow's own convert clips them), and an
    embedded ICC profile is honoured so wide-gamut or CMYK photos keep their colours.
    """
    icc = img.info.get("icc_profile")
    alpha: Image.Image | None = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("RGB", "L") and "transparency" in img.info:
        img = img.convert("RGBA" if img.mode == "RGB" else "LA")
    elif img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA" if img.mode != "La" else "LA")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    elif img.mode.startswith(("I", "F")):
        img = _wide_to_l(img)
    elif img.mode == "1":
        img = img.convert("L")
    rgb = _apply_icc(img, icc) if icc else None
    if rgb is None:
        rgb = img.convert("RGB")
    if alpha is not None:
        backdrop = Image.new("RGB", rgb.size, WHITE)
        backdrop.paste(rgb, mask=alpha)
        rgb = backdrop
    return rgb


def _wide_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit (I;16*), 32-bit integer (I) and float (F) samples to 8-bit L.

    I;16 is 0-65535 by definition. I holds 16-bit data when PNG or HEIF decoders produce it, so
    it is read as 0-65535 too. F is read as 0-1 when it fits, as 0-255 otherwise.
    """
    samples = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if samples.size and float(np.nanmax(samples)) <= 1.0 else 255.0
    else:
        top = 65535.0
    scaled = np.nan_to_num(samples, nan=0.0) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _apply_icc(img: Image.Image, icc: bytes) -> Image.Image | None:
    """Convert from the embedded profile to sRGB; None when the profile cannot be used."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        # a fresh sRGB profile per call: LittleCMS profile handles are not shared across threads
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        logger.info("ignoring unusable ICC profile on a %s photo (%s)", img.mode, type(exc).__name__)
        return None


# --- framing -------------------------------------------------------------------------------------


def _frame(rgb: Image.Image, size: tuple[int, int], kind: str, limits: IntakeLimits) -> NormalisedPhoto:
    """Crop a square (around the face when there is exactly one), resize, measure and encode."""
    boxes = faces.detect_faces(rgb, size)
    flags: list[str] = []
    if not boxes:
        flags.append("no_face")
        crop = faces.centre_square(size)
    elif len(boxes) > 1:
        flags.append("several_faces")
        crop = faces.centre_square(size)
    else:
        crop = faces.crop_around_face(boxes[0], size)
        _, _, fw, fh = boxes[0]
        if fw * fh < SMALL_FACE_AREA * size[0] * size[1]:
            flags.append("small_face")

    sx, sy = rgb.width / size[0], rgb.height / size[1]
    left, top, side, _ = crop
    box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
    out = rgb.resize((limits.out_size, limits.out_size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)

    if imagehash.sharpness(np.asarray(out.convert("L"))) < BLUR_THRESHOLD:
        flags.append("blurry")

    # Nothing of the upload's metadata goes into the kept file: its ICC profile no longer applies
    # (the pixels are sRGB now), and EXIF or text chunks could carry location or names.
    out.info.clear()
    buffer = io.BytesIO()
    out.save(buffer, "PNG")
    logger.debug("normalised a %s photo %dx%d, flags=%s", kind, size[0], size[1], flags)
    return NormalisedPhoto(
        png=buffer.getvalue(),
        sha256=imagehash.pixel_sha256(out),
        phash=imagehash.perceptual_hash(out),
        source_format=kind,
        width=size[0],
        height=size[1],
        face_box=boxes[0] if boxes else None,
        flags=tuple(flags),
        warnings=tuple(WARNINGS[f] for f in flags),
    )


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB".replace(".0 MB", " MB")
