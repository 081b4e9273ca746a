"""PNG files of generated pictures: rows filtered with numpy, deflated in parallel bands.

A picture's PNG is encoded after the GPU's last kernel, so its encoding time is part of every
request's latency. Pillow's encoder, even at zlib level 1, spends about half its time choosing a
filter for each row, and runs on one core. This one filters every row with PNG's Up filter (which
suits photographs) in one numpy operation and deflates four bands of rows in parallel threads (zlib
releases the GIL): several times faster than Pillow at the same level, for files of about the same
size (`python -m bench.png_speed`; figures in bench/RESULTS.md).

The result is an ordinary PNG that any decoder reads: one IDAT chunk holding one zlib stream, whose
bands are raw deflate blocks joined at sync flushes, and the Adler-32 of all the filtered rows. The
bytes depend only on the pixels (the band count is fixed), so a seed keeps giving the same file.
"""

from __future__ import annotations

import functools
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BANDS = 4
LEVEL = 1  # zlib level: much faster than the default 6 for a few percent more bytes (bench/png_speed.py)
SIGNATURE = b"\x89PNG\r\n\x1a\n"
UP_FILTER = 2
RGB_COLOUR_TYPE = 2


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2 * BANDS, thread_name_prefix="png")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _filtered(pixels: np.ndarray) -> np.ndarray:
    """The PNG scanlines of an (H, W, 3) uint8 picture: a filter byte, then each byte minus the one above."""
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    lines = np.empty((height, width * channels + 1), dtype=np.uint8)
    lines[:, 0] = UP_FILTER
    lines[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=lines[1:, 1:])  # uint8 wraps modulo 256, as PNG specifies
    return lines


def _deflate(band: np.ndarray, last: bool) -> bytes:
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)  # raw deflate: the zlib header is added once
    return compressor.compress(band) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _assemble(lines: np.ndarray, bands: list[bytes], width: int, height: int) -> bytes:
    stream = b"\x78\x01" + b"".join(bands) + struct.pack(">I", zlib.adler32(lines))
    header = struct.pack(">IIBBBBB", width, height, 8, RGB_COLOUR_TYPE, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def encode_rgb(pictures: list[np.ndarray]) -> list[bytes]:
    """PNG bytes of (H, W, 3) uint8 pictures; all their bands are deflated at once."""
    for picture in pictures:
        if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 picture, not {picture.dtype} {picture.shape}")
    lines = [_filtered(np.ascontiguousarray(p)) for p in pictures]
    splits = [np.array_split(ls, min(BANDS, len(ls))) for ls in lines]
    futures = [[_pool().submit(_deflate, band, i == len(parts) - 1) for i, band in enumerate(parts)]
               for parts in splits]
    return [_assemble(ls, [f.result() for f in fs], p.shape[1], p.shape[0])
            for ls, fs, p in zip(lines, futures, pictures, strict=True)]
