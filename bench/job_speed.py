"""A whole training job on the GPU, as a worker runs it: first-time class images, then photos to saved LoRA.

With the base model already in GPU memory (as in a worker), at the trainer's default settings
(800 steps, prior preservation, 100 class images, rank 16, at the base model's resolution: 512 px
for SD1.5, 1024 for SDXL, jobs.train_defaults):

1. the first-time class images of one class, generated into an empty cache;
2. the training warm-up a worker runs at its start (`trainer.dreambooth.warm_up`: compiling the
   step's UNet stages, on a GPU), timed on its own;
3. a job with those class images cached, from `train()` to the saved LoRA files, with the time of
   each stage taken from the trainer's own progress events (the first job of a process also
   captures the CUDA graphs: kernel selection and module loading happen then);
4. the same job again (graph capture now warm), as every later job of a worker runs.

The baseline, measured in the same process: diffusers' recipe (bench.train_speed.recipe_for) for
`--recipe-steps` steps and one batch of class images through a plain eager pipeline (NCHW UNet, no
graphs), extrapolated to the job's 800 steps and 100 images (a full recipe job would take minutes
of GPU time).

    python -m bench.job_speed --json job.json                      # sd15-random on the GPU
    python -m bench.job_speed --model sdxl-random --json job.json  # SDXL at 1024 px
    python -m bench.job_speed --model tiny --steps 20 --class-images 4   # CPU smoke test

Within a ten-minute run on a cold compile cache (SDXL's compile takes minutes): `--jobs 1` skips the
second job, `--no-compile` trains with graphs of plain stages, and fewer `--class-images` shortens
the first stage (the baseline's class images are extrapolated per image either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.generate_speed import sync, timed
from bench.train_speed import (
    CLASS_WORD,
    HANDLE,
    base_resolution,
    bench_pipeline,
    plain_layout,
    recipe_for,
    synthetic_photos,
    time_steps,
)
from jobs.events import Stage
from jobs.requests import TrainConfig
from jobs.train_defaults import for_family, left_to_family
from trainer.class_images import ensure_class_images
from trainer.dreambooth import class_prompt, train, warm_up
from trainer.family import family_of


def run_job(pipe: Any, config: TrainConfig, photos: list, model: str, root: Path, cache: Path,
            tag: str) -> dict[str, Any]:
    """One `train()` call; its time in total and per stage (from the trainer's stage events), in
    integer nanoseconds of one clock: the stages tile the call, so they add up to the total exactly."""
    marks: list[tuple[str, int]] = []

    def on_event(event: Any) -> None:
        if isinstance(event, Stage):
            marks.append((event.stage, time.monotonic_ns()))

    sync(pipe.device)
    started = time.monotonic_ns()
    result = train(photos, HANDLE, CLASS_WORD, config, pipeline=pipe, base_model=model, out_dir=root / tag / "out",
                   work_dir=root / tag / "work", class_cache_dir=cache, on_event=on_event)
    sync(pipe.device)
    ended = time.monotonic_ns()
    # The first stage counts from the call: train() announces it before doing anything else.
    bounds = [started, *(at for _name, at in marks[1:]), ended]
    stages_ns: dict[str, int] = {}
    for (name, _at), begin, end in zip(marks, bounds[:-1], bounds[1:], strict=True):
        stages_ns[name] = stages_ns.get(name, 0) + end - begin
    figures = {"total_s": (ended - started) / 1e9, "stages_s": {k: v / 1e9 for k, v in stages_ns.items()},
               "total_ns": ended - started, "stages_ns": stages_ns, "steps": result.steps,
               "final_loss": result.final_loss}
    print(f"{tag:<34} {figures['total_s']:7.1f} s  "
          + "  ".join(f"{k} {v:.1f}" for k, v in figures["stages_s"].items()), flush=True)
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = bench_pipeline(args.model, args.device)
    device = pipe.device
    resolution = base_resolution(pipe)
    config = for_family(TrainConfig(steps=args.steps, num_class_images=args.class_images, resolution=resolution,
                                    compiled_stages=None if args.compile else False,
                                    family_defaults=left_to_family({"resolution"})), family_of(pipe).name)
    photos = synthetic_photos(resolution, count=10)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "model": args.model, "steps": config.steps,
                           "class_images": config.num_class_images, "class_image_steps": config.class_image_steps,
                           "class_image_batch": config.class_image_batch}
    print(" ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "class-cache"
        prompt = class_prompt(CLASS_WORD)
        sync(device)
        started = time.monotonic()
        made = ensure_class_images(pipe, args.model, prompt, resolution, config.num_class_images, cache,
                                   steps=config.class_image_steps, batch_size=config.class_image_batch)
        sync(device)
        out["class_images_first_time_s"] = time.monotonic() - started
        print(f"{'first-time class images':<34} {out['class_images_first_time_s']:7.1f} s "
              f"({made.generated} images)", flush=True)
        out["training_warm_up_s"] = warm_up(pipe, config, root / "warm-up")
        print(f"{'training warm-up (worker start)':<34} {out['training_warm_up_s']:7.1f} s", flush=True)
        out["first_job"] = run_job(pipe, config, photos, args.model, root, cache, "job (first in process)")
        if args.jobs > 1:
            out["job"] = run_job(pipe, config, photos, args.model, root, cache, "job (graphs warm)")

        # Baseline: the recipe's step and a plain eager class-image batch, extrapolated.
        batch = config.class_image_batch
        with plain_layout(pipe):
            per_image = timed(lambda: ensure_class_images(pipe, args.model, prompt + ", plain", resolution, batch,
                                                          cache, steps=config.class_image_steps, batch_size=batch,
                                                          graphs=False), device) / batch
        with plain_layout(pipe):
            recipe = recipe_for(pipe, photos, config, made.paths)
            try:
                step_ms = statistics.median(time_steps(recipe.step, 3, args.recipe_steps, device))
            finally:
                recipe.close()
        out["baseline"] = {"class_image_s": per_image, "recipe_step_ms": step_ms,
                           "class_images_s": per_image * config.num_class_images,
                           "job_steps_s": step_ms * config.steps / 1000}
        print(f"{'baseline: eager class images':<34} {out['baseline']['class_images_s']:7.1f} s "
              f"(extrapolated from {batch})", flush=True)
        print(f"{'baseline: recipe steps':<34} {out['baseline']['job_steps_s']:7.1f} s "
              f"({step_ms:.1f} ms x {config.steps})", flush=True)
    out["ratios"] = {
        "class_images": out["baseline"]["class_images_s"] / out["class_images_first_time_s"],
        "job_vs_recipe_steps": out["baseline"]["job_steps_s"] / out.get("job", out["first_job"])["total_s"],
    }
    print("ratios (baseline / ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in out["ratios"].items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--class-images", type=int, default=TrainConfig.num_class_images)
    parser.add_argument("--recipe-steps", type=int, default=20, help="timed recipe steps for the baseline")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: also a second job, with graph capture warm, as a worker's later jobs run")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the step's UNet stages (--no-compile: CUDA graphs of plain stages)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
