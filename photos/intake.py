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
- Photos are checked before decoding (byte size, pixel count and the memory decoding would take,
  from the header; animation; a JPEG's count of scans and APP segments), so a decompression bomb
  is refused without allocating its pixels and a JPEG made to keep libjpeg busy is refused as
  'corrupt' before libjpeg sees it. Truncated files are refused as 'corrupt': Pillow's
  LOAD_TRUNCATED_IMAGES is left off, and a JPEG cut short and closed with an end marker (which
  libjpeg decodes with the rest in grey) is recognised by its missing scans or its grey tail.
- Large pictures are reduced (JPEG while decoding, others right after) to what the crop needs
  before anything else is done with them, and 16-bit samples are scaled to 8 bits in strips, so
  a photo costs little more memory than its decoded pixels.
- Photos without one clear face are kept with a warning (flags): the person decides.

`normalise_photo` is pure: bytes in, a `NormalisedPhoto` or an `IntakeError` out. It writes no
files, so there is never a partial file to clean up; the storage layer stores the result. The bot
runs it in a capped worker process (photos/sandbox.py), where running out of memory or time is
refused with the same message as a photo over the decoding budget ('too_costly').
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from photos import faces, imagehash, jpeg_markers

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
    "too_costly",
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
    max_decode_bytes: int = 400 * 1024 * 1024
    """Memory that decoding one photo may take, estimated from its header (see `decode_cost`). A
    50 MP photo needs 200 MB as PNG (Pillow keeps RGB in 4 bytes a pixel), 300 MB as a progressive
    4:4:4 JPEG (libjpeg's coefficient buffer), 384 MB as a 48 MP HEIC (libheif's copy and Pillow's),
    while libwebp holds about 4 copies of a picture: WebP stops near 25 MP."""
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


@dataclass(frozen=True)
class Refusal:
    """A photo that is not kept, as a plain value: what its `IntakeError` says."""

    code: IntakeCode
    message: str

    @classmethod
    def of(cls, error: IntakeError) -> Refusal:
        return cls(error.code, error.message)


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


def normalise_or_refuse(data: bytes, limits: IntakeLimits = DEFAULT_LIMITS) -> NormalisedPhoto | Refusal:
    """`normalise_photo` with its refusal returned rather than raised: what an intake process runs.

    Under the process's memory cap an allocation that does not fit raises MemoryError; that photo
    is 'too_costly', like one whose header shows it would not fit.
    """
    try:
        return normalise_photo(data, limits)
    except IntakeError as exc:
        return Refusal.of(exc)
    except MemoryError:
        return Refusal.of(too_costly())


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


def too_costly() -> IntakeError:
    """The refusal for a photo that needs more memory or time than one photo may take."""
    return IntakeError(
        "too_costly",
        "That photo is too large or too damaged for me to open. "
        "Please send a smaller copy, or the original straight from your phone.",
    )


def _decode(data: bytes, kind: str, limits: IntakeLimits) -> tuple[Image.Image, tuple[int, int]]:
    """Decode just enough pixels, upright. Returns the image and the original size after orientation.

    Header checks come first: Image.open only parses the header, so the pixel count, the memory
    decoding takes, the frame count and the short side are known before any pixel is allocated.
    Every failure of the decoder on these untrusted bytes (Pillow raises OSError, SyntaxError,
    ValueError, struct.error and more) is 'corrupt', except running out of memory ('too_costly');
    nothing else escapes.
    """
    layout = jpeg_markers.read_layout(data) if kind == "JPEG" else None
    if layout is not None and layout.too_many_segments:
        logger.info("refused a JPEG of %d scans, %d APP segments, %d segments",
                    layout.scans, layout.app_segments, layout.segments)
        raise _corrupt()
    formats = ["JPEG", "MPO"] if kind == "JPEG" else [kind]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        raise _too_many_pixels(limits, None) from None
    except MemoryError:  # under an intake process's memory cap
        raise too_costly() from None
    except Exception as exc:  # untrusted bytes: see docstring
        logger.info("unreadable %s upload (%s)", kind, type(exc).__name__)
        raise _corrupt() from None
    with img:
        header_size = img.size
        if header_size[0] * header_size[1] > limits.max_pixels:
            raise _too_many_pixels(limits, header_size)
        # libjpeg scales by 1/2, 1/4 or 1/8 as it decodes
        draft_scale = 1 << (min(_reduction(header_size, limits), 8).bit_length() - 1) if layout is not None else 1
        cost = decode_cost(img.mode, header_size, kind, layout, draft_scale)
        if cost > limits.max_decode_bytes:
            logger.info("refused a %s %s upload of %dx%d: decoding takes about %d MB",
                        kind, img.mode, *header_size, cost // 2**20)
            raise too_costly()
        if img.format in ("PNG", "WEBP") and getattr(img, "is_animated", False):
            raise _animated()
        if min(header_size) < limits.min_side:
            try:
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception:  # a broken EXIF block only costs the order of the numbers
                orientation = 1
            raise _too_small(_upright(header_size, orientation), limits)
        if draft_scale >= 2:
            img.draft(None, (header_size[0] // draft_scale, header_size[1] // draft_scale))
        try:
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            if layout is not None and (layout.missing_scans() or _ends_in_grey(img)):
                logger.info("refused a JPEG that ends early")
                raise _corrupt()
            upright = ImageOps.exif_transpose(_shrink(_eight_bit(img), limits))
        except Image.DecompressionBombError:
            raise _too_many_pixels(limits, header_size) from None
        except MemoryError:
            raise too_costly() from None
        except IntakeError:
            raise
        except Exception as exc:  # untrusted bytes: see docstring
            logger.info("undecodable %s upload (%s)", kind, type(exc).__name__)
            raise _corrupt() from None
    return upright, _upright(header_size, orientation)


_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
"""Bytes a pixel takes in Pillow's memory, for the modes under 4 (every other mode, RGB too, takes 4)."""

_DECODER_COPIES = {"WEBP": 4, "HEIF": 2}
"""Copies of the picture a decoder holds at its peak, measured: libwebp's animation decoder keeps
its canvas and the previous one, then hands Pillow a bytes copy; libheif decodes into its own
buffer, which Pillow copies. libjpeg and zlib write straight into Pillow's image."""


def decode_cost(mode: str, size: tuple[int, int], kind: str, layout: jpeg_markers.JpegLayout | None = None,
                draft_scale: int = 1) -> int:
    """Bytes of memory decoding a picture of `mode` and `size` takes, known from its header alone.

    A JPEG decoded at 1/`draft_scale` takes that much less for its pixels, but a progressive one
    also holds every DCT coefficient of the full-size picture until its last scan.
    """
    width, height = size
    pixels = -(-width // draft_scale) * -(-height // draft_scale)
    cost = pixels * _PIXEL_BYTES.get(mode, 4) * _DECODER_COPIES.get(kind, 1)
    if layout is not None:
        cost += layout.coefficient_bytes(width, height)
    return cost


def _ends_in_grey(img: Image.Image) -> bool:
    """Whether a decoded JPEG ends in the flat grey libjpeg puts where its data ran out.

    A JPEG cut short and closed with an end marker decodes without an error: libjpeg warns
    ("premature end of data segment"), which Pillow does not pass on, and gives every block after
    the cut zero coefficients, exactly mid-grey (127 once Adobe CMYK is inverted). Blocks are
    stored in rows from the top left, so the cut shows as a grey run at the end of the last row;
    a run of an eighth of the width at one exact value is far more than a photo's noise allows.
    """
    width, height = img.size
    grey = 127 if img.mode == "CMYK" else 128
    last_row = np.asarray(img.crop((0, height - 1, width, height))).reshape(width, -1)
    not_grey = np.flatnonzero(np.any(last_row != grey, axis=1))
    grey_run = width - (int(not_grey[-1]) + 1 if not_grey.size else 0)
    return grey_run >= max(2, width // 8)


def _reduction(size: tuple[int, int], limits: IntakeLimits) -> int:
    """By how much a picture of `size` can shrink and still give the crop all the pixels it needs.

    The factor keeps both framings at least `out_size` pixels wide: the centre square (the short
    side) and the tightest crop around a face that is not small (CROP_FACTOR x the side of a face
    of SMALL_FACE_AREA). A 12 MP phone photo is used at half size, which is most of the speed-up
    of decoding a JPEG reduced, and only a flagged small face is ever upscaled.
    """
    width, height = size
    tightest_face_crop = faces.CROP_FACTOR * math.sqrt(SMALL_FACE_AREA * width * height)
    return max(1, int(min(min(width, height), tightest_face_crop) // limits.out_size))


_STRIP_ROWS = 256
"""Rows converted or reduced at a time: a strip of a 50 MP picture is a few megabytes."""

_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
"""round(v * 255 / 65535) for every 16-bit value v (65535 = 255 * 257), as a lookup table."""


def _strips(img: Image.Image, rows: int = _STRIP_ROWS) -> Iterator[tuple[int, Image.Image]]:
    """(top row, strip) pairs covering `img` from the top, `rows` rows at a time."""
    width, height = img.size
    for top in range(0, height, rows):
        yield top, img.crop((0, top, width, min(height, top + rows)))


_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK"})
"""Modes whose samples `reduce` can average (wide ones are 8-bit L by then); palette and bilevel
pictures are left as they are."""


def _shrink(img: Image.Image, limits: IntakeLimits) -> Image.Image:
    """`img` reduced by the largest whole factor the crop allows (a JPEG's draft did most of it).

    Done before colour conversion and rotation, which each copy the picture, and strip by strip
    (`reduce` copies an RGBA picture whole to premultiply it), so that a 50 MP PNG costs its
    decoded pixels and little more.
    """
    factor = _reduction(img.size, limits)
    if factor < 2 or img.mode not in _REDUCIBLE:
        return img
    rows = _STRIP_ROWS - _STRIP_ROWS % factor
    reduced = Image.new(img.mode, (-(-img.width // factor), -(-img.height // factor)))
    for top, strip in _strips(img, rows):
        reduced.paste(strip.reduce(factor), (0, top // factor))
    reduced.info = img.info.copy()
    return reduced


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


def _eight_bit(img: Image.Image) -> Image.Image:
    """`img` with 16-bit, 32-bit or float samples scaled to 8-bit L; any other mode as it is."""
    return _wide_to_l(img) if img.mode.startswith(("I", "F")) else img


def _wide_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit (I;16*), 32-bit integer (I) and float (F) samples to 8-bit L.

    I;16 is 0-65535 by definition. I holds 16-bit data when PNG or HEIF decoders produce it, so
    it is read as 0-65535 too. F is read as 0-1 when it fits, as 0-255 otherwise.

    Strip by strip, with integers where the samples are integers: the memory this takes is the
    8-bit result and one strip, whatever the picture's size (a 50 MP 16-bit PNG once took 1.7 GB
    in float64 copies here).
    """
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    if img.mode == "F":
        fits_in_one = all(float(np.nan_to_num(np.asarray(strip), nan=0.0).max(initial=0.0)) <= 1.0
                          for _, strip in _strips(img))
        scale = 255.0 if fits_in_one else 1.0
        for top, strip in _strips(img):
            samples = np.nan_to_num(np.asarray(strip, dtype=np.float32), nan=0.0) * np.float32(scale)
            out[top : top + strip.height] = np.clip(np.rint(samples, out=samples), 0, 255, out=samples)
    else:
        for top, strip in _strips(img):
            samples = np.asarray(strip)
            if img.mode == "I":
                samples = np.clip(samples, 0, 65535)
            out[top : top + strip.height] = _SIXTEEN_TO_EIGHT[samples]
    result = Image.fromarray(out, mode="L")
    result.info = img.info.copy()
    return result


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
