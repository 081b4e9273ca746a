"""What upscaling a picture (the U#N button) costs, against drawing the picture, in one process.

An upscale (trainer.upscale) enlarges the picture 2x with Lanczos and redraws it with img2img at
strength 0.3 (the bot's `UPSCALE_STRENGTH`): about a third of the steps, on four times the pixels,
with the VAE tiled above the model's native size. This measures, with a person's LoRA merged
(random rank-16 weights written like a trained one):

- picture: `GenerationEngine.generate`, one picture at the model's native square size (512 px for
  `sd15-random`, 1024 px for `sdxl-random`), `--steps` steps;
- upscale: `GenerationEngine.upscale` of that picture, to twice its width and height.

Both run on one engine, eager by default (no CUDA graphs, nothing compiled), so the ratio compares
the same code; `--graphs` gives the picture the CUDA graphs a worker replays (upscales never use
them: see trainer.engine), the ratio a worker without compiled blocks sees. Each time is the median
of `--repeats` runs after one untimed warm-up, with the peak GPU memory of each (weights included),
and the upscale's PNG size against Discord's default 10 MiB upload limit (random weights draw
noisier pictures than a trained model, so real PNGs are smaller).

`--model` takes any spec `trainer.pipelines.load_pipeline` accepts: `sd15-random`, `sdxl-random`,
or `tiny` for a CPU check of the script.

    python -m bench.upscale_cost [--model sd15-random] [--device cuda] [--steps 25] [--repeats 3] [--graphs] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.generate_speed import make_random_lora, peak_mib, reset_peak, timed
from jobs.requests import GenerateRequest
from trainer.engine import GenerationEngine
from trainer.pipelines import load_pipeline, pick_device, pick_dtype

log = logging.getLogger(__name__)

PROMPT = "a portrait photo of a person, studio light"
UPSCALE_STRENGTH = 0.3  # bot.views.UPSCALE_STRENGTH (the bench may not import the bot)
DISCORD_DEFAULT_LIMIT = 10 * 2**20


def measure(run: Any, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of `repeats` runs after a warm-up, and the peak GPU MiB over them."""
    run()
    reset_peak(device)
    seconds = statistics.median(timed(run, device) for _ in range(repeats))
    return seconds, peak_mib(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graphs", action="store_true", help="the picture replays CUDA graphs, as on a worker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device_name = pick_device(args.device)
    device = torch.device(device_name)
    dtype = pick_dtype(device_name)
    pipe = load_pipeline(args.model, device=device_name, dtype=dtype)
    engine = GenerationEngine(pipe, cuda_graphs=args.graphs, compile_blocks=False)
    with tempfile.TemporaryDirectory() as folder:
        lora = make_random_lora(pipe, Path(folder), seed=1, rank=16)
        person = {"adapter_key": "person", "lora_path": lora, "handle": "sks", "class_word": "person"}
        request = GenerateRequest(prompt=PROMPT, seed=1, steps=args.steps, face_pass=False)  # the picture alone
        [picture] = engine.generate(request, **person)  # reads the LoRA file once
    upscale_request = GenerateRequest(prompt=PROMPT, seed=1, steps=args.steps, strength=UPSCALE_STRENGTH)

    drawing_s, drawing_peak = measure(lambda: engine.generate(request, **person), args.repeats, device)
    upscale_s, upscale_peak = measure(lambda: engine.upscale(upscale_request, picture.png, **person),
                                      args.repeats, device)
    [big] = engine.upscale(upscale_request, picture.png, **person)
    size = Image.open(io.BytesIO(picture.png)).size
    big_size = Image.open(io.BytesIO(big.png)).size
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device_name,
        "torch": torch.__version__, "model": args.model, "dtype": str(dtype), "steps": args.steps,
        "strength": UPSCALE_STRENGTH, "graphs": args.graphs, "repeats": args.repeats,
        "picture": {"size": list(size), "seconds": round(drawing_s, 4),
                    "peak_mib": None if drawing_peak is None else round(drawing_peak)},
        "upscale": {"size": list(big_size), "seconds": round(upscale_s, 4),
                    "peak_mib": None if upscale_peak is None else round(upscale_peak),
                    "png_bytes": len(big.png), "over_discord_default_limit": len(big.png) > DISCORD_DEFAULT_LIMIT},
        "upscale_over_picture": round(upscale_s / drawing_s, 3),
    }
    memory = "" if upscale_peak is None else f", peak {drawing_peak:.0f} -> {upscale_peak:.0f} MiB"
    print(f"{args.model} on {results['device']}: picture {size[0]}x{size[1]} {drawing_s:.3f} s, upscale to "
          f"{big_size[0]}x{big_size[1]} {upscale_s:.3f} s ({upscale_s / drawing_s:.2f}x of the picture)"
          f"{memory}; upscale PNG {len(big.png) / 2**20:.2f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
