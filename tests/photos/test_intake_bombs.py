"""How intake meets hostile uploads in-process: what is refused from the header alone, how a JPEG
cut short is recognised, and that the memory-saving paths give the same pixels as the plain ones.
Their cost in memory is measured in the intake pool's children (tests/photos/test_sandbox.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile, WebPImagePlugin

from photos import intake
from photos.intake import IntakeError, IntakeLimits, decode_cost, normalise_photo
from photos.jpeg_markers import read_layout
from tests.photos import bombs
from tests.photos import intake_corpus as corpus
from tests.photos_factory import encode, face_image, face_jpeg, portrait

HEADER_BOMBS = [case for case in corpus.BOMBS if case.name in (
    "bomb_lossless_webp_7000", "bomb_jpeg_10000_scans", "bomb_jpeg_8mib_of_app1")]


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The pictures decoded (their format), by every path that allocates pixels."""
    seen: list[str] = []
    for cls in (ImageFile.ImageFile, WebPImagePlugin.WebPImageFile):
        original = cls.load

        def load(self, original=original):
            seen.append(self.format)
            return original(self)
        monkeypatch.setattr(cls, "load", load)
    return seen


@pytest.mark.parametrize("case", HEADER_BOMBS, ids=lambda case: case.name)
def test_header_bombs_are_refused_before_any_pixel_is_decoded(case, decodes):
    with pytest.raises(IntakeError) as refused:
        normalise_photo(case.make(), case.limits)
    assert refused.value.code == case.expect
    assert decodes == []


def test_the_decode_watch_sees_a_normal_photo_decoded(decodes):
    normalise_photo(face_jpeg())
    assert decodes and set(decodes) == {"JPEG"}


def test_decoding_costs_its_pixels_at_the_modes_size_times_the_decoders_copies():
    side = (7071, 7071)
    assert decode_cost("I;16", side, "PNG") == 7071 * 7071 * 2
    assert decode_cost("RGB", side, "PNG") == decode_cost("L", side, "PNG") * 4
    assert decode_cost("RGB", (7000, 7000), "WEBP") == 7000 * 7000 * 4 * 4
    assert decode_cost("RGB", (8000, 6000), "HEIF") == 8000 * 6000 * 4 * 2
    layout = read_layout(encode(portrait((64, 64)), "JPEG", progressive=True))
    assert decode_cost("RGB", (64, 64), "JPEG", layout, 2) == 32 * 32 * 4 + layout.coefficient_bytes(64, 64)
    limit = IntakeLimits().max_decode_bytes
    assert decode_cost("RGBA", side, "PNG") < limit and decode_cost("RGB", (8000, 6000), "HEIF") < limit
    assert decode_cost("RGB", (5000, 5000), "WEBP") <= limit < decode_cost("RGB", (5200, 5200), "WEBP")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9, 0.99])
def test_a_jpeg_closed_with_an_end_marker_after_a_cut_is_refused_as_damaged(fraction):
    with pytest.raises(IntakeError) as refused:
        normalise_photo(bombs.cut_with_end_marker(face_jpeg(), fraction))
    assert refused.value.code == "corrupt"


def test_a_cmyk_jpeg_cut_short_is_refused_too():
    data = encode(corpus.textured("CMYK", (200, 20, 10, 10)), "JPEG", quality=95)
    normalise_photo(data)
    with pytest.raises(IntakeError, match="damaged"):
        normalise_photo(bombs.cut_with_end_marker(data))


def test_a_grey_corner_smaller_than_a_cut_leaves_is_a_photo():
    """Mid-grey pixels at the end of the last row, as a cut would leave, but over a sixteenth of it."""
    img = np.array(face_image())
    img[-16:, -img.shape[1] // 16:] = 128
    photo = normalise_photo(encode(Image.fromarray(img), "JPEG", quality=100, subsampling=0))
    assert photo.flags == ()


def test_a_progressive_jpeg_cut_inside_its_last_scan_is_kept():
    """Its last scan refines the lowest bit of the luma detail: the lower part misses only that."""
    photo = normalise_photo(bombs.cut_with_end_marker(bombs.progressive_selfie(), 0.8))
    assert photo.flags == ()


def _float64_reference(img: Image.Image) -> np.ndarray:
    """What 16-bit reduction computed before it worked in strips (1.7 GB for 50 MP)."""
    samples = np.asarray(img).astype(np.float64)
    top = (1.0 if float(np.nanmax(samples)) <= 1.0 else 255.0) if img.mode == "F" else 65535.0
    return np.clip(np.rint(np.nan_to_num(samples, nan=0.0) * (255.0 / top)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F", "F01"])
def test_wide_samples_reduce_in_strips_to_the_same_pixels(mode, monkeypatch):
    monkeypatch.setattr(intake, "_STRIP_ROWS", 7)  # many strips, the last one short
    rng = np.random.default_rng(3)
    shape = (45, 31)
    if mode.startswith("I;16"):
        samples = rng.integers(0, 65536, shape, dtype=np.uint16)
        img = Image.frombytes(mode, shape[::-1], samples.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(rng.integers(-5000, 80000, shape, dtype=np.int32), mode="I")
    else:
        samples = rng.uniform(0, 1 if mode == "F01" else 300, shape).astype(np.float32)
        samples[0, :3] = (np.nan, np.inf, -np.inf)
        img = Image.fromarray(samples, mode="F")
    reduced = intake._wide_to_l(img)
    assert reduced.mode == "L"
    assert np.array_equal(np.asarray(reduced), _float64_reference(img))


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "LA"])
def test_large_pictures_shrink_in_strips_to_the_same_pixels(mode, monkeypatch):
    monkeypatch.setattr(intake, "_STRIP_ROWS", 50)
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (3003, 2999, 4), dtype=np.uint8), mode="RGBA").convert(mode)
    img.info["icc_profile"] = b"kept"
    factor = intake._reduction(img.size, IntakeLimits())
    assert factor == 2
    shrunk = intake._shrink(img, IntakeLimits())
    assert np.array_equal(np.asarray(shrunk), np.asarray(img.reduce(factor)))
    assert shrunk.info["icc_profile"] == b"kept"
