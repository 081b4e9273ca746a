"""The PNG encoder of generated pictures (trainer.png): standard files that decode to the exact pixels."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.photos_factory import colour_fields
from trainer import png


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk, checking every CRC on the way."""
    assert data[:8] == png.SIGNATURE
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, payload = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        out.append((kind, payload))
        at += 12 + length
    return out


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 3), (7, 13), (64, 48), (768, 512)])
def test_pictures_decode_to_their_exact_pixels(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    pictures = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8), smooth(*shape)]
    for picture, data in zip(pictures, png.encode_rgb(pictures), strict=True):
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(decoded), picture)
        kinds = [kind for kind, _ in chunks(data)]
        assert kinds == [b"IHDR", b"IDAT", b"IEND"]
        # One zlib stream whose Adler-32 checks out (zlib verifies it), holding Up-filtered rows.
        lines = zlib.decompress(chunks(data)[1][1])
        assert len(lines) == shape[0] * (shape[1] * 3 + 1)
        assert lines[0] == png.UP_FILTER


def test_the_same_pixels_always_give_the_same_bytes_and_smooth_pictures_compress() -> None:
    picture = smooth(256, 256)
    first, again = png.encode_rgb([picture, picture.copy()])
    assert first == again == png.encode_rgb([picture])[0]
    assert len(first) < picture.nbytes / 4  # the Up filter and deflate really compress


def test_a_photo_is_no_larger_than_pillows_fast_png() -> None:
    photo = np.asarray(colour_fields(1, 512, cells=8, seed=0)[0])
    pillow = io.BytesIO()
    Image.fromarray(photo).save(pillow, format="PNG", compress_level=1)
    assert len(png.encode_rgb([photo])[0]) <= len(pillow.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8)])
def test_anything_but_rgb_bytes_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        png.encode_rgb([bad])


@pytest.mark.parametrize("text, kind", [("a photo, Steps: 2\nSeed: 7", b"tEXt"), ("un café", b"tEXt"),
                                        ("zqjane 🌙 日本", b"iTXt")])
def test_text_goes_between_the_header_and_the_pixels_and_pillow_reads_it(text: str, kind: bytes) -> None:
    picture = smooth(8, 8)
    data = png.encode_rgb([picture], [{"parameters": text}])[0]
    assert [k for k, _ in chunks(data)] == [b"IHDR", kind, b"IDAT", b"IEND"]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.info["parameters"] == text and decoded.text == {"parameters": text}
    assert np.array_equal(np.asarray(decoded), picture)
    assert png.encode_rgb([picture], [{"parameters": text}])[0] == data  # still the same bytes every time


def test_each_picture_gets_its_own_text() -> None:
    pictures = [smooth(4, 4), smooth(4, 4)]
    first, second = png.encode_rgb(pictures, [{"parameters": "Seed: 1"}, {"parameters": "Seed: 2"}])
    assert Image.open(io.BytesIO(first)).info["parameters"] == "Seed: 1"
    assert Image.open(io.BytesIO(second)).info["parameters"] == "Seed: 2"
    with pytest.raises(ValueError, match="texts"):
        png.encode_rgb(pictures, [{"parameters": "one"}])
