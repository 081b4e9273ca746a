"""The command line's flows from a cold and a warm machine, against diffusers' own tools, in one run.

Someone who runs `python -m trainer train` once on a fresh GPU machine waits for everything: the
process's start, the model's load, class images, any compiling (trainer.compile_choice decides
whether to compile) and the steps. So each flow here is a fresh process timed by the wall clock,
from its start to its exit:

- `train`: ours with an empty compile cache (`cold`, a new machine) and again with the cache and the
  finished-run marker the first left (`warm`), against diffusers' `train_dreambooth_lora.py` (given
  with `--diffusers-script`; fetched from the diffusers repository, never committed) with the same
  photos, steps, rank, prior preservation and class images;
- `imagine --n N`: ours cold and warm with the trained LoRA, against a plain `StableDiffusionPipeline`
  that loads the same model and LoRA and draws N pictures with the same steps.

The model is saved once as a folder both sides read (`sd15-random` on the GPU: full size, random
weights). Figures are seconds and the ratio of the baseline's time to each (above 1: faster than the
baseline); a flow that failed says so.

    python -m bench.cli_speed --diffusers-script /path/to/train_dreambooth_lora.py     # on the GPU
    python -m bench.cli_speed --model tiny --device cpu --steps 4 --class-images 2     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HANDLE, CLASS = "sks", "person"
# The plain pipeline, as a person following diffusers' docs would draw with a LoRA.
PLAIN_PIPELINE = """
import sys, torch
from diffusers import StableDiffusionPipeline
model, lora, n, steps, device, out = sys.argv[1:7]
dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None).to(device)
pipe.load_lora_weights(lora, weight_name="pytorch_lora_weights.safetensors")
images = pipe("a photo of sks person on the moon", num_images_per_prompt=int(n), num_inference_steps=int(steps)).images
for i, image in enumerate(images):
    image.save(f"{out}/plain-{i}.png")
"""


def timed(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `command` to its end: its wall-clock seconds, whether it succeeded and, if not, the end of
    its output."""
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    figure: dict[str, Any] = {"seconds": time.monotonic() - started, "ok": code == 0}
    if code != 0:
        figure["output_end"] = log.read_text(errors="replace")[-2000:]
    return figure


def make_inputs(root: Path, args: argparse.Namespace, env: dict[str, str]) -> tuple[Path, Path]:
    """The model folder and a folder of photos, made before anything is timed."""
    # Imported here: bench.train_speed imports torch, which only the timed processes need.
    from bench.train_speed import synthetic_photos

    model = root / "model"
    subprocess.run([sys.executable, "-m", "trainer", "make-model", args.model, str(model)], env=env, check=True)
    photos = root / "photos"
    photos.mkdir()
    for i, photo in enumerate(synthetic_photos(512, args.photos)):
        photo.save(photos / f"photo-{i}.png")
    return model, photos


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="a kind `python -m trainer make-model` builds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--class-images", type=int, default=100)
    parser.add_argument("--photos", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pictures", type=int, default=4)
    parser.add_argument("--picture-steps", type=int, default=25)
    parser.add_argument("--diffusers-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"model": args.model, "device": args.device, "steps": args.steps,
                               "class_images": args.class_images}
    with tempfile.TemporaryDirectory(prefix="cli-speed-") as scratch:
        root = Path(scratch)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        model, photos = make_inputs(root, args, env)
        cache, classes = root / "compile-cache", root / "class-cache"
        ours = [sys.executable, "-m", "trainer", "train", "--photos", str(photos), "--handle", HANDLE,
                "--class", CLASS, "--model", str(model), "--steps", str(args.steps), "--rank", str(args.rank),
                "--class-images", str(args.class_images), "--device", args.device, "--compile-cache", str(cache)]
        for kind in ("cold", "warm"):  # the warm run keeps the compile cache, not the class images
            results[f"train ours {kind}"] = timed(
                [*ours, "--out", str(root / f"lora-{kind}"), "--class-cache", str(classes / kind)],
                env, root / f"train-{kind}.log")
        if args.diffusers_script is not None:
            results["train diffusers' script"] = timed([
                sys.executable, str(args.diffusers_script), "--pretrained_model_name_or_path", str(model),
                "--instance_data_dir", str(photos), "--instance_prompt", f"a photo of {HANDLE} {CLASS}",
                "--with_prior_preservation", "--class_data_dir", str(root / "script-classes"),
                "--class_prompt", f"a photo of {CLASS}", "--num_class_images", str(args.class_images),
                "--resolution", "512", "--train_batch_size", "1", "--max_train_steps", str(args.steps),
                "--learning_rate", "1e-4", "--rank", str(args.rank), "--seed", "0",
                "--output_dir", str(root / "script-out"),
                *(["--mixed_precision", "bf16"] if args.device.startswith("cuda") else [])],
                env, root / "train-script.log")
        lora = root / "lora-cold"
        pictures = root / "pictures"
        pictures.mkdir()
        imagine = [sys.executable, "-m", "trainer", "imagine", f"a photo of {HANDLE} {CLASS} on the moon",
                   "--lora", str(lora), "--model", str(model), "--n", str(args.pictures), "--steps",
                   str(args.picture_steps), "--seed", "1", "--device", args.device, "--out", str(pictures),
                   "--compile-cache", str(root / "imagine-cache")]
        for kind in ("cold", "warm"):
            results[f"imagine ours {kind}"] = timed(imagine, env, root / f"imagine-{kind}.log")
        results["imagine plain pipeline"] = timed(
            [sys.executable, "-c", PLAIN_PIPELINE, str(model), str(lora), str(args.pictures),
             str(args.picture_steps), args.device, str(pictures)], env, root / "imagine-plain.log")
        report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict[str, Any]) -> None:
    print(f"model={results['model']} device={results['device']} steps={results['steps']} "
          f"class_images={results['class_images']}", flush=True)
    for flow, baseline in (("train", "train diffusers' script"), ("imagine", "imagine plain pipeline")):
        base = results.get(baseline)
        for name, figure in results.items():
            if not name.startswith(flow) or not isinstance(figure, dict):
                continue
            if not figure["ok"]:
                print(f"  {name:<28} failed; its output ended:\n{figure['output_end']}")
                continue
            ratio = (f"{base['seconds'] / figure['seconds']:.2f}x the baseline's speed"
                     if base is not None and base["ok"] else "no baseline in this run")
            print(f"  {name:<28} {figure['seconds']:8.1f} s  {ratio}")


if __name__ == "__main__":
    main()
