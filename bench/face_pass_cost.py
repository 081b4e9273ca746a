"""What the face pass adds to a picture request, against the plain picture, in one process.

With a person's model, `trainer.engine.GenerationEngine.generate` draws the pictures and then, by
default, redraws each face found at the model's native size (trainer.face_pass: img2img at strength
0.4 with the LoRA still merged, the crops of all pictures batched) and pastes it back. This measures,
for requests of one and of four square pictures, with a random rank-16 LoRA resident:

- plain: `generate(face_pass=False)`, the picture as it was drawn before the pass existed;
- with the pass: the same request with `face_pass=True`, one face per picture.

Random weights draw no faces, so the engine's detector is replaced by one that reports a face in the
picture's centre, a fifth of its side wide (a head-and-shoulders or half-body framing, the case the
pass is for); the Haar detector's own time (milliseconds on the CPU) is timed apart on a picture of
that size. The engine runs as a worker runs it: CUDA graphs on a GPU, the UNet and decoder compiled
with `--compile` (off by default: compiling takes minutes, and speeds the pass and the picture
alike). Each figure is the median of `--repeats` requests after one untimed request (which captures
the graphs of each new shape), plain and with the pass taking turns, with the pass's added time as a
fraction of the plain picture's.

    python -m bench.face_pass_cost [--model sd15-random|sdxl-random|tiny] [--device cuda] [--repeats 5] [--json out.json]
    python -m bench.face_pass_cost --model tiny --device cpu --steps 4 --repeats 3   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.generate_speed import make_random_lora
from jobs.requests import GenerateRequest
from trainer import face_pass
from trainer.engine import GenerationEngine
from trainer.pipelines import load_pipeline, pick_device

log = logging.getLogger(__name__)

PROMPT = "a photo of sks woman walking in a park, autumn light"
FACE_FRACTION = 0.2  # of the picture's short side


def centre_face(image: Image.Image) -> list[face_pass.Box]:
    """One face box in the picture's centre, FACE_FRACTION of its short side wide."""
    side = round(FACE_FRACTION * min(image.size))
    return [((image.width - side) // 2, (image.height - side) // 2, side, side)]


def paired_medians(runs: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median ms of each run, the runs taking turns so that anything else slowing the machine for
    a while slows each of them alike."""
    for run in runs.values():
        run()  # untimed: captures the graphs of a new shape, allocates, picks kernels
        sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            sync()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random",
                        help="sd15-random, sdxl-random, tiny, or any spec trainer.pipelines.load_pipeline takes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="compile the UNet and decoder as a worker does (minutes on a cold inductor cache)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = pick_device(args.device)
    pipe = load_pipeline(args.model, device=device)
    with tempfile.TemporaryDirectory() as folder:
        lora = make_random_lora(pipe, Path(folder), seed=1, rank=16)
        engine = GenerationEngine(pipe, compile_blocks=args.compile and device.startswith("cuda"),
                                  face_detector=centre_face)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        if args.compile:
            engine.warm_up()
        width, height = engine.image_size("square")
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "model": args.model, "steps": args.steps, "size": f"{width}x{height}",
            "native": engine.base_resolution, "dtype": str(pipe.unet.dtype), "compiled": args.compile}
        for count in (1, 4):
            def draw(face: bool, count: int = count) -> None:
                request = GenerateRequest(prompt=PROMPT, num_images=count, seed=0, steps=args.steps, face_pass=face)
                engine.generate(request, adapter_key="person", lora_path=lora, handle="sks", class_word="woman")

            medians = paired_medians({"plain": lambda: draw(False), "pass": lambda: draw(True)}, args.repeats, sync)
            plain, with_pass = medians["plain"], medians["pass"]
            added = with_pass - plain
            results[f"n={count}"] = {"plain_ms": round(plain, 2), "with_face_pass_ms": round(with_pass, 2),
                                     "added_per_picture_ms": round(added / count, 2),
                                     "added_over_plain": round(added / plain, 4)}
            print(f"{count} picture(s): plain {plain:.1f} ms, with the face pass {with_pass:.1f} ms "
                  f"(+{added / count:.1f} ms a picture, +{added / plain:.1%} of the plain picture)", flush=True)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    detect = paired_medians({"detect": lambda: face_pass.detect_faces(picture)}, args.repeats, lambda: None)["detect"]
    results["haar_detect_ms"] = round(detect, 2)
    print(f"Haar detection on a {width}x{height} picture (CPU): {detect:.1f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
