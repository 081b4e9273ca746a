"""Fuzzing photo intake with damaged versions of valid photos.

Whatever the bytes, `normalise_photo` must either return a valid 512x512 RGB PNG or raise
`IntakeError`: no other exception may reach the bot. Intake writes no files (it returns bytes
for the storage layer to write atomically), so a refused or crashing upload can never leave a
partial file behind: that holds by design, not by cleanup.

Examples are bounded and derandomised so the run is short and the same in CI. The pixel limit is
lowered so that a mutated header claiming a large image stays cheap to refuse or decode.
"""

from __future__ import annotations

import functools
import io
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from photos.intake import IntakeError, IntakeLimits, normalise_photo
from tests.photos import intake_corpus as corpus
from tests.photos_factory import encode, portrait

LIMITS = IntakeLimits(max_pixels=2_000_000)

# A damaged EXIF block makes Pillow warn and skip the tag; that is the expected, handled path.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small valid photos in every accepted container, with the metadata parsers have to read."""
    face = portrait((300, 360))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": encode(face, "JPEG", quality=85, exif=exif),
        "jpeg_progressive": encode(face, "JPEG", quality=80, progressive=True),
        "png": encode(face, "PNG", icc_profile=corpus.rgb_swapping_icc()),
        "png_palette": encode(corpus.palette_with_hole().resize((300, 300)), "PNG"),
        "webp": encode(face, "WEBP", quality=80, exif=exif),
        "webp_lossless": encode(face, "WEBP", lossless=True),
    }


def check(data: bytes) -> None:
    """The property: a valid normalised photo, or an IntakeError with a message."""
    try:
        photo = normalise_photo(data, LIMITS)
    except IntakeError as error:
        assert error.code and error.message
        return
    img = Image.open(io.BytesIO(photo.png))
    img.load()
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (512, 512))


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A seed photo with a few bytes overwritten (half of them in the headers), maybe cut short.

    The first 4 bytes are left alone: a broken magic number is simply 'not_image', and
    shrinking toward position 0 would otherwise spend most examples there.
    """
    data = bytearray(seeds()[draw(st.sampled_from(sorted(seeds())))])
    for _ in range(draw(st.integers(1, 6))):
        limit = len(data) - 1 if draw(st.booleans()) else min(400, len(data) - 1)
        data[draw(st.integers(4, limit))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.slow
@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(damaged())
def test_damaged_photos_give_a_photo_or_an_intake_error(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize("name", ["jpeg", "png", "webp"])
def test_every_cut_of_a_header_is_handled(name: str) -> None:
    data = seeds()[name]
    for end in range(0, 200, 3):
        check(data[:end])


def test_random_byte_runs_in_valid_photos_are_handled() -> None:
    rng = random.Random(20240601)
    for _ in range(60):
        data = bytearray(seeds()[rng.choice(sorted(seeds()))])
        start = rng.randrange(len(data))
        run = rng.randbytes(rng.randint(1, 64))
        data[start : start + len(run)] = run
        check(bytes(data))


def test_seeds_are_valid_photos() -> None:
    """The fuzzer starts from photos that intake keeps, so mutations explore real decoding paths."""
    for data in seeds().values():
        assert normalise_photo(data, LIMITS).png
