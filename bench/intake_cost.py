"""What hostile and large uploads cost photo intake, measured in its capped child processes.

Each upload goes through an `IntakePool` of one process, as the bot sends it: the bomb corpus of
tests/photos/bombs.py (issue #27) and, with `--large`, the largest legitimate photos intake accepts
(50 MP PNGs and progressive JPEG, a 48 MP HEIC, a 25 MP WebP: building them takes about 30 s).
For each: the outcome, the child's peak resident memory during that photo (VmHWM, reset before
each task) and the wall-clock time of the round trip. A fresh child first answers a small selfie,
and what it holds afterwards is the floor of every later figure.

    python -m bench.intake_cost [--large] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from photos.intake import IntakeLimits, NormalisedPhoto
from photos.sandbox import IntakePool
from tests.photos import intake_corpus as corpus
from tests.photos_factory import face_jpeg


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _textured(size: tuple[int, int]) -> Image.Image:
    """A grey-blue picture with a little noise, for the lossy encoders (flat pictures for the others:
    what decoding costs does not depend on the pixels)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(120 + rng.integers(0, 12, (size[1], size[0], 3), dtype=np.uint8))


def large_photos() -> list[tuple[str, Callable[[], bytes]]]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    side = (7071, 7071)
    return [
        ("png_rgb_50mp", lambda: _encode(Image.new("RGB", side, (120, 130, 140)), "PNG")),
        ("png_rgba_50mp", lambda: _encode(Image.new("RGBA", side, (120, 130, 140, 200)), "PNG")),
        ("jpeg_progressive_444_50mp", lambda: _encode(_textured(side), "JPEG", quality=80, progressive=True,
                                                      subsampling=0, bufsize=side[0] * side[1] * 3)),
        ("heic_48mp", lambda: _encode(Image.new("RGB", (8000, 6000), (120, 130, 140)), "HEIF", quality=30)),
        ("webp_25mp", lambda: _encode(_textured((5000, 5000)), "WEBP", quality=50, method=0)),
    ]


async def measure(uploads: list[tuple[str, Callable[[], bytes]]]) -> list[dict[str, object]]:
    pool = IntakePool(1)
    rows = []
    try:
        for name, make in uploads:
            data = make()
            started = time.perf_counter()
            result = await pool.normalise(data, IntakeLimits())
            elapsed = time.perf_counter() - started
            outcome = result.outcome
            rows.append({
                "upload": name, "bytes": len(data),
                "outcome": "kept" if isinstance(outcome, NormalisedPhoto) else outcome.code,
                "peak_rss_mb": round((result.peak_rss_bytes or 0) / 2**20),
                "seconds": round(elapsed, 2),
            })
            print(f"{name:<44} {len(data):>10} B  {rows[-1]['outcome']:<11} "
                  f"peak {rows[-1]['peak_rss_mb']:>4} MB  {elapsed:6.2f} s", flush=True)
    finally:
        await pool.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also the largest photos intake accepts (slow to build)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON as well")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"Pillow {Image.__version__}")
    uploads: list[tuple[str, Callable[[], bytes]]] = [("selfie 800x1000 (first photo of the child)", face_jpeg)]
    uploads += [(case.name, case.make) for case in corpus.BOMBS]
    if args.large:
        uploads += large_photos()
    rows = asyncio.run(measure(uploads))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
