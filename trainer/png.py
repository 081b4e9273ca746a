"""PNG files of generated pictures: rows filtered with numpy, deflated in parallel bands.

A picture's PNG is encoded after the GPU's last kernel, so its encoding time is part of every
request's latency. Pillow's encoder, even at zlib level 1, spends about half its time choosing a
filter for each row, and runs on one core. This one filters every row with PNG's Up filter (which
suits photographs) in one numpy operation and deflates four bands of rows in parallel threads (zlib
releases the GIL): several times faster than Pillow at the same level, for files of about the same
size (`python -m bench.png_speed`; figures in bench/RESULTS.md).

The result is an ordinary PNG that any decoder reads: one IDAT chunk holding one zlib stream, whose
bands are raw deflate blocks joined at sync flushes, and the Adler-32 of all the filtered rows. The
bytes depend only on the pixels (the band count is fixed) and the text given, so a seed keeps giving
the same file.

Text (a picture's settings, jobs.png_parameters) goes in a chunk between IHDR and IDAT, where Pillow
writes it: tEXt when Latin-1 holds it, otherwise an uncompressed UTF-8 iTXt, as Pillow's
`PngInfo.add_text` (which A1111 uses) chooses.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Mapping, Sequence
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


def text_chunk(key: str, text: str) -> bytes:
    """A tEXt chunk, or an iTXt one (no compression, language or translated keyword) for text that
    Latin-1 cannot hold. PNG text may not contain NUL, so any is left out."""
    keyword, text = key.encode("latin-1"), text.replace("\0", "")
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ValueError(f"a PNG text keyword is 1-79 Latin-1 characters without NUL, not {key!r}")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated keyword, each NUL-ended
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + text.encode("utf-8"))


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


def _assemble(lines: np.ndarray, bands: list[bytes], width: int, height: int, texts: Mapping[str, str]) -> bytes:
    stream = b"\x78\x01" + b"".join(bands) + struct.pack(">I", zlib.adler32(lines))
    header = struct.pack(">IIBBBBB", width, height, 8, RGB_COLOUR_TYPE, 0, 0, 0)
    text = b"".join(text_chunk(key, value) for key, value in texts.items())
    return SIGNATURE + _chunk(b"IHDR", header) + text + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def encode_rgb(pictures: list[np.ndarray], texts: Sequence[Mapping[str, str]] | None = None) -> list[bytes]:
    """PNG bytes of (H, W, 3) uint8 pictures; all their bands are deflated at once. `texts`: for each
    picture, text chunks by keyword (Pillow reads them back as `Image.open(...).text`)."""
    if texts is None:
        texts = [{} for _ in pictures]
    elif len(texts) != len(pictures):
        raise ValueError(f"{len(texts)} texts for {len(pictures)} pictures")
    for picture in pictures:
        if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 picture, not {picture.dtype} {picture.shape}")
    lines = [_filtered(np.ascontiguousarray(p)) for p in pictures]
    splits = [np.array_split(ls, min(BANDS, len(ls))) for ls in lines]
    futures = [[_pool().submit(_deflate, band, i == len(parts) - 1) for i, band in enumerate(parts)]
               for parts in splits]
    return [_assemble(ls, [f.result() for f in fs], p.shape[1], p.shape[0], t)
            for ls, fs, p, t in zip(lines, futures, pictures, texts, strict=True)]
