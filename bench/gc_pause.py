"""Garbage-collector pauses in a warm worker: a full collection before and after `gc.freeze()`.

The worker's job thread stops for every collection, and a full one walks every object alive, which
after compiling the generation engine is over a million (trainer.gc_pauses). In one process:

- the engine is built and warmed up (compiled for one square picture) as a worker does;
- baseline: the median time of a full collection (`gc.collect()`) in that state;
- ours: the same after `trainer.gc_pauses.freeze_long_lived()`, as the worker now does when warm,
  with the count of objects a collection still walks then (`objects_after_freezing`);
- then one picture is drawn and a collection timed again: what a job leaves behind stays small;
- with `--train-steps`, then one training (prior preservation off, the GPU's default CUDA-graphed
  step) is run and what it leaves to the collector is counted: the objects only a collection frees,
  their commonest types, the time to find them and the time to free them, and the GPU memory they held.

On a CPU the engine only compiles when told, so this compiles the tiny model's stages with inductor
(`--backend`); on a GPU it compiles the engine's default way.

    python -m bench.gc_pause                      # tiny model on the CPU, inductor (about a minute)
    python -m bench.gc_pause --model sd15-random  # on a CUDA GPU
    python -m bench.gc_pause --model sd15-random --no-engine --train-steps 50   # a training's garbage only
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.train_speed import bench_pipeline, synthetic_photos
from jobs.requests import GenerateRequest, TrainConfig
from trainer.dreambooth import train
from trainer.engine import GenerationEngine
from trainer.gc_pauses import freeze_long_lived


def full_collection_ms(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def reserved_gib(device: torch.device) -> float:
    return torch.cuda.memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0


def garbage_of_a_training(pipe: Any, model: str, steps: int) -> dict[str, Any]:
    """Train once, then find (without freeing) and free what only a collection frees."""
    config = TrainConfig(steps=steps, prior_preservation=False, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gc.collect()
        gc.disable()  # nothing is collected before it is counted
        try:
            train(synthetic_photos(config.resolution, count=5), "zqbench", "person", config, pipeline=pipe,
                  base_model=model, out_dir=root / "out", work_dir=root / "work", class_cache_dir=root / "classes")
            before = reserved_gib(pipe.device)
            gc.set_debug(gc.DEBUG_SAVEALL)  # found objects go to gc.garbage instead of being freed
            started = time.perf_counter()
            found = gc.collect()
            find_ms = (time.perf_counter() - started) * 1000
            types = collections.Counter(type(o).__name__ for o in gc.garbage).most_common(8)
            gc.set_debug(0)
            gc.garbage.clear()  # the cycles are unreachable again: the next collection frees them
            started = time.perf_counter()
            gc.collect()
            free_ms = (time.perf_counter() - started) * 1000
        finally:
            gc.set_debug(0)
            gc.enable()
    return {"steps": steps, "objects": found, "find_ms": find_ms, "free_ms": free_ms, "types": types,
            "reserved_gib_before": before, "reserved_gib_after": reserved_gib(pipe.device)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = bench_pipeline(args.model, args.device)
    on_gpu = pipe.device.type == "cuda"
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(pipe.device) if on_gpu else "cpu",
                              "model": args.model}
    if args.no_engine:
        result["frozen"] = freeze_long_lived()
    else:
        result.update(engine_figures(pipe, args, on_gpu, result["device"]))
    if args.train_steps:
        result["after_a_training"] = trained = garbage_of_a_training(pipe, args.model, args.train_steps)
        print(f"after a {trained['steps']}-step training: {trained['objects']} objects left to the collector, "
              f"found in {trained['find_ms']:.1f} ms, freed in {trained['free_ms']:.1f} ms; GPU memory reserved "
              f"{trained['reserved_gib_before']:.2f} -> {trained['reserved_gib_after']:.2f} GiB", flush=True)
        print("  commonest: " + ", ".join(f"{name} {n}" for name, n in trained["types"]), flush=True)
    return result


def engine_figures(pipe: Any, args: argparse.Namespace, on_gpu: bool, device: str) -> dict[str, Any]:
    """Full collections in a warm engine's process, before and after freezing, and after a picture."""
    engine = GenerationEngine(pipe, compile_blocks=True if not on_gpu else None, compile_backend=args.backend)
    warm_up_s = engine.warm_up(counts=(1,))
    print(f"device={device} model={args.model} backend={args.backend} warm-up {warm_up_s:.1f} s", flush=True)
    result: dict[str, Any] = {"backend": args.backend, "warm_up_s": warm_up_s}
    result["objects"] = len(gc.get_objects())
    result["baseline_full_collection_ms"] = full_collection_ms(args.repeats)
    result["frozen"] = freeze_long_lived()
    # What a full collection still walks: the objects made since the freeze, not the frozen ones.
    result["objects_after_freezing"] = len(gc.get_objects())
    result["ours_full_collection_ms"] = full_collection_ms(args.repeats)
    engine.generate(GenerateRequest(prompt="a photo of a person", steps=args.steps))
    result["ours_after_a_picture_ms"] = full_collection_ms(args.repeats)
    result["ratio"] = result["baseline_full_collection_ms"] / max(result["ours_full_collection_ms"], 1e-3)
    print(f"objects alive after the warm-up                {result['objects']:>10}", flush=True)
    print(f"objects a collection walks after freezing      {result['objects_after_freezing']:>10}")
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
    parser.add_argument("--train-steps", type=int, default=0, help="then count what a training this long leaves")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine's figures (no compiling)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
