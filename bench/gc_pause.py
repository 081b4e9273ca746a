"""Garbage-collector pauses in a warm worker: a full collection before and after `gc.freeze()`.

The worker's job thread stops for every collection, and a full one walks every object alive, which
after compiling the generation engine is over a million (trainer.gc_pauses). In one process:

- the engine is built and warmed up (compiled for one square picture) as a worker does;
- baseline: the median time of a full collection (`gc.collect()`) in that state;
- ours: the same after `trainer.gc_pauses.freeze_long_lived()`, as the worker now does when warm;
- then one picture is drawn and a collection timed again: what a job leaves behind stays small.

On a CPU the engine only compiles when told, so this compiles the tiny model's stages with inductor
(`--backend`); on a GPU it compiles the engine's default way.

    python -m bench.gc_pause                      # tiny model on the CPU, inductor (about a minute)
    python -m bench.gc_pause --model sd15-random  # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.train_speed import bench_pipeline
from trainer.engine import GenerateRequest, GenerationEngine
from trainer.gc_pauses import freeze_long_lived


def full_collection_ms(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = bench_pipeline(args.model, args.device)
    on_gpu = pipe.device.type == "cuda"
    engine = GenerationEngine(pipe, compile_blocks=True if not on_gpu else None, compile_backend=args.backend)
    warm_up_s = engine.warm_up(counts=(1,))
    device = torch.cuda.get_device_name(pipe.device) if on_gpu else "cpu"
    print(f"device={device} model={args.model} backend={args.backend} warm-up {warm_up_s:.1f} s", flush=True)
    result: dict[str, Any] = {"device": device, "model": args.model, "backend": args.backend, "warm_up_s": warm_up_s}
    result["objects"] = len(gc.get_objects())
    result["baseline_full_collection_ms"] = full_collection_ms(args.repeats)
    result["frozen"] = freeze_long_lived()
    result["ours_full_collection_ms"] = full_collection_ms(args.repeats)
    engine.generate(GenerateRequest(prompt="a photo of a person", steps=args.steps))
    result["ours_after_a_picture_ms"] = full_collection_ms(args.repeats)
    result["ratio"] = result["baseline_full_collection_ms"] / max(result["ours_full_collection_ms"], 1e-3)
    print(f"objects alive after the warm-up                {result['objects']:>10}", flush=True)
    print(f"baseline: full collection                      {result['baseline_full_collection_ms']:10.1f} ms")
    print(f"ours: full collection, {result['frozen']} objects frozen   "
          f"{result['ours_full_collection_ms']:10.3f} ms")
    print(f"ours: full collection after a picture          {result['ours_after_a_picture_ms']:10.3f} ms")
    print(f"ratio (baseline / ours)                        {result['ratio']:10.0f}x", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (CPU), sd15-random (GPU), a hub id or a folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for the engine's stages")
    parser.add_argument("--repeats", type=int, default=5, help="timed full collections per figure")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the picture drawn after freezing")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
