"""Hostile uploads, built in code with Pillow and byte surgery (each in about a second at most).

Each one reproduces a finding of a review that attacked photo intake (issue #27):
- F1: `gray16_png` (97 kB, 7071x7071 16-bit grayscale: 1.7 GB in float64 copies) and
  `lossless_webp` (a few bytes, 7000x7000: 800 MB in libwebp's and Pillow's copies);
- F2: `scan_bomb` (a progressive JPEG whose smallest AC scan is repeated 10 000 times: every scan is
  a pass over every block, 44 s on the reviewer's machine) and `app1_bomb` (8 MiB of tiny EXIF
  segments, which Pillow joins one by one: quadratic, 53 s);
- F8: `cut_with_end_marker` (a JPEG cut at half its length and closed with an end marker, which
  libjpeg decodes with the missing half grey).
"""

from __future__ import annotations

import functools
import struct
import zlib

from PIL import Image

from tests.photos_factory import encode, face_jpeg, portrait

SOS, EOI = b"\xff\xda", b"\xff\xd9"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def gray16_png(side: int = 7071) -> bytes:
    """A black 16-bit grayscale PNG of side x side (50 MP at 7071), compressed row by row to ~100 kB."""
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    deflate = zlib.compressobj(9)
    row = b"\x00" * (2 * side + 1)  # filter byte, then the samples
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def lossless_webp(side: int = 7000) -> bytes:
    """A flat lossless WebP of side x side: a few dozen bytes for 49 MP."""
    return encode(Image.new("RGB", (side, side), (120, 130, 140)), "WEBP", lossless=True, method=0, quality=0)


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (its SOS header and entropy-coded data) of a JPEG."""
    scans, pos = [], data.index(SOS)
    while data[pos : pos + 2] == SOS:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
            end += 1
        scans.append((pos, end))
        pos = end
        while data[pos : pos + 2] != SOS and data[pos : pos + 2] != EOI:  # tables between scans
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return scans


def scan_bomb(side: int = 7000, repeats: int = 10_000) -> bytes:
    """A progressive JPEG of side x side whose smallest AC scan comes `repeats` more times."""
    base = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True, quality=50)
    scans = _scans(base)
    spectral_start = [base[start + 5 + 2 * base[start + 4]] for start, _ in scans]
    start, end = min((s for s, ss in zip(scans, spectral_start, strict=True) if ss > 0), key=lambda s: s[1] - s[0])
    last = scans[-1][1]
    return base[:last] + base[start:end] * repeats + base[last:]


def app1_bomb(size: int = 8 * 1024 * 1024) -> bytes:
    """A selfie preceded by `size` bytes of EXIF segments holding 4 bytes each."""
    segment = b"\xff\xe1\x00\x0c" + b"Exif\x00\x00" + b"\x00" * 4
    data = face_jpeg()
    return data[:2] + segment * (size // len(segment)) + data[2:]


@functools.cache
def progressive_selfie() -> bytes:
    return encode(portrait(), "JPEG", quality=90, progressive=True)


def cut_with_end_marker(data: bytes, fraction: float = 0.5) -> bytes:
    """The first `fraction` of a JPEG, closed with an end marker as a repair tool would."""
    return data[: int(len(data) * fraction)] + EOI


def cut(data: bytes, fraction: float = 0.5) -> bytes:
    """The first `fraction` of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * fraction)]
