"""What the image safety checker adds to a picture request, against drawing the pictures, in one process.

With SAFETY=images a worker runs diffusers' Stable Diffusion safety checker on every picture it
makes, after the pictures are drawn and encoded: its time adds to each request's latency. This
measures, for requests of one and of four pictures:

- baseline: drawing them with a plain diffusers `StableDiffusionPipeline` (eager, `--steps` steps,
  512 px for `sd15-random`), as a plain pipeline's user would;
- the checker: `trainer.safety_checker.ImageChecker.flags` on the PNGs, as the worker calls it
  (decoding, CLIP preprocessing, the vision model), loaded from a folder with `load_checker`.

The checker has the architecture of `CompVis/stable-diffusion-safety-checker` (CLIP ViT-L/14 vision
tower and projection) with random weights: the compute is the real one, the verdicts are not.
With `--model tiny` the tiny stand-in and the tiny pipeline are used (a CPU check of the script).
Each figure is the median ms of `--repeats` runs, with the ratio checker / drawing.

    python -m bench.safety_cost [--model sd15-random] [--device cuda] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

from trainer.pipelines import build_random_pipeline, pick_device, pick_dtype
from trainer.safety_checker import ImageChecker, load_checker, save_stand_in

PROMPT = "a portrait photo of a person, studio light"


def save_full_size_checker(out: Path) -> Path:
    """A random checker with the standard one's shapes: CLIP ViT-L/14 at 224 px, 768-d projection."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    config = CLIPConfig(text_config=CLIPTextConfig(projection_dim=768).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=768)
    torch.manual_seed(0)
    StableDiffusionSafetyChecker(config).save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def median_ms(run: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    run()  # warm-up: first-call allocations and kernel selection are not what a worker pays per request
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def pngs_of(images: list[Any]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd15-random", "tiny"), default="sd15-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(device)
    pipe = build_random_pipeline(args.model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        source = (save_full_size_checker(Path(folder)) if args.model == "sd15-random"
                  else save_stand_in(Path(folder), flag_all=False))
        checker = load_checker(str(source), args.model, device)
    assert isinstance(checker, ImageChecker)

    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                               "model": args.model, "steps": args.steps, "dtype": str(dtype)}
    for count in (1, 4):
        generator = torch.Generator(device).manual_seed(0)

        def draw(count: int = count, generator: torch.Generator = generator) -> list[Any]:
            return pipe(PROMPT, num_inference_steps=args.steps, num_images_per_prompt=count,
                        generator=generator).images

        drawing = median_ms(draw, args.repeats, sync)
        pngs = pngs_of(draw())
        verdicts = checker.flags(pngs)
        checking = median_ms(lambda pngs=pngs: checker.flags(pngs), args.repeats, sync)
        results[f"n={count}"] = {"drawing_ms": round(drawing, 2), "checker_ms": round(checking, 2),
                                 "checker_over_drawing": round(checking / drawing, 4), "verdicts": len(verdicts)}
        print(f"{count} picture(s): drawing {drawing:.1f} ms, checker {checking:.1f} ms "
              f"({checking / drawing:.3f}x of drawing)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
