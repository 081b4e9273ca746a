"""PNG encoding of generated pictures: the project's encoder (trainer.png) against Pillow's, in one process.

A request's PNGs are encoded after the GPU's last kernel, so this time adds to every picture's
latency. Two kinds of 512 px pictures: photograph-like (a smooth upscaled pattern with grain, as a
real model draws) and noise-like (what the random-weight benchmark models draw, which compresses
worst). For one picture and for a request of four:

- baseline: Pillow's PNG encoder at its default level (6), as a plain pipeline's user saves;
- Pillow at zlib level 1, one thread per picture (the engine's previous encoder);
- ours: Up filter in numpy, four bands deflated in parallel threads at level 1.

Each figure is the median ms of `--repeats` runs, with the file size and the ratio baseline / figure.

    python -m bench.png_speed [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer import png


def pictures(kind: str, count: int, size: int = 512) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "noise-like":
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    out = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size),
                                                                                         Image.Resampling.BICUBIC)
        grain = rng.normal(0, 3, (size, size, 3))
        out.append(np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    return out


def pillow(level: int) -> Callable[[list[np.ndarray]], list[bytes]]:
    def encode_one(picture: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    def encode(batch: list[np.ndarray]) -> list[bytes]:
        if len(batch) == 1:
            return [encode_one(batch[0])]
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            return list(pool.map(encode_one, batch))

    return encode


def median_ms(encode: Callable[[list[np.ndarray]], list[bytes]], batch: list[np.ndarray],
              repeats: int) -> tuple[float, int]:
    files = encode(batch)  # warm-up: thread pools, allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, sum(len(f) for f in files) // len(files)


def run(repeats: int) -> dict[str, Any]:
    encoders = {"baseline: Pillow, level 6": pillow(6), "Pillow, level 1, a thread per picture": pillow(1),
                "ours: Up filter, 4 bands in parallel, level 1": lambda batch: png.encode_rgb(batch)}
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    print(f"{os.cpu_count()} CPUs", flush=True)
    for kind in ("photograph-like", "noise-like"):
        for count in (1, 4):
            batch = pictures(kind, count)
            rows = {name: median_ms(encode, batch, repeats) for name, encode in encoders.items()}
            base_ms = rows["baseline: Pillow, level 6"][0]
            for name, (ms, size) in rows.items():
                print(f"{kind:<16} n={count}  {name:<46} {ms:8.1f} ms  {size // 1024:5d} KiB/picture  "
                      f"{base_ms / ms:6.2f}x", flush=True)
            results[f"{kind} n={count}"] = {name: {"ms": ms, "bytes": size} for name, (ms, size) in rows.items()}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
