"""Generation speed: the engine (merged LoRAs, CUDA graphs) against loading a LoRA per request, in one process.

Two people's LoRAs (random weights, rank 16 on the UNet's attention projections, diffusers format) are
served alternately, as a shared bot serves consecutive requests from different people:

- baseline: a plain `StableDiffusionPipeline` (`StableDiffusionXLPipeline` on an SDXL base, at
  1024 px), per request `load_lora_weights(path)`, generate,
  `unload_lora_weights()`, then the PNG encoded with PIL's default settings;
- ours: `trainer.engine.GenerationEngine` with both LoRAs resident (each request merges its person's
  update into the weights and restores them after; on CUDA the UNet and VAE decoder replay CUDA
  graphs captured from their inductor-compiled stages), returning PNG bytes as the bot receives
  them; the same engine with the base model alone, to show what a person's LoRA costs; on CUDA also
  with graphs of compiled blocks instead of stages, of plain blocks, and without graphs, to show each
  lever's share.

On a Flux base the baseline is a plain `FluxPipeline`, both sides sample with the model's own
flow-matching Euler scheduler and the guidance is FLUX.1-dev's distilled 3.5 (one transformer pass
per step, no negative prompt), and the engine runs the transformer eagerly (no graphs or compiling:
trainer.flow_matching says why), so the figures show what merging resident LoRAs saves over loading one
per request.

Both sample with the same scheduler (the engine's default, DPM-Solver++ 2M Karras, built from the same
config) for the same number of steps, at the same size, guidance and CPU-generator seeds, so the
denoising work is identical; what differs is how the LoRA and the kernels are handled (and the PNG
compression level). The output also compares the pictures: mean absolute pixel difference between
ours and the baseline for the same request (bf16 rounding differs between a merged weight and
PEFT's separate low-rank path), between compiled and plain blocks, and between ours with and without graphs.

Figures: seconds per image (one request, n=1), seconds per batch of 4 (one request, n=4), the LoRA
switch time (ours: merging a resident LoRA and restoring the weights; baseline: load + unload), the
time to load a LoRA the first time, the one-off graph capture time, and peak GPU memory. Each time is
the median of timed runs after one untimed warm-up, with `torch.cuda.synchronize` around each, and is
printed with its fastest and slowest run and with the ratio baseline / ours.

    python -m bench.generate_speed                           # full-size random SD1.5, 512 px, bf16, 25 steps
    python -m bench.generate_speed --model sdxl-random       # full-size random SDXL, 1024 px
    python -m bench.generate_speed --model flux-random       # full-size random FLUX.1-dev, 1024 px
    python -m bench.generate_speed --model flux-random --quantize int8 --resolution 512
                                                             # its weights in int8, as on a 24 GB card
    python -m bench.generate_speed --model tiny --steps 3    # CPU smoke test (tiny-sdxl: SDXL's layout)
    python -m bench.generate_speed --json results.json

Within a ten-minute run on a cold compile cache (SDXL's compile takes minutes): `--no-variants`,
`--no-static-shapes`, or `--no-compile` (graphs of plain blocks), and fewer `--repeats` and `--switches`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from bench.train_speed import bench_pipeline, plain_layout
from jobs.requests import DEFAULT_SCHEDULER, GenerateRequest, TrainConfig
from jobs.train_defaults import for_family
from jobs.worker_config import QUANTIZE_MODES
from trainer.engine import GenerationEngine
from trainer.family import family_of
from trainer.lora_io import save_diffusers
from trainer.noise_schedulers import SchedulerCache

PROMPT = "a photo of sks woman on a beach at sunset"


class _UnetOnlyLoraNotice(logging.Filter):
    """diffusers warns on every baseline load of a LoRA without text-encoder weights, as these are."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


logging.getLogger("diffusers.loaders.lora_base").addFilter(_UnetOnlyLoraNotice())
NEGATIVE = "blurry, low quality"
USERS = ("alice", "bob")
# The adapter name a LoRA gets while its random weights are made; it never stays on the UNet.
SCRATCH_ADAPTER = "bench_scratch"


def make_random_lora(pipe: DiffusionPipeline, out_dir: Path, seed: int, rank: int) -> Path:
    """A diffusers-format LoRA file for the pipeline's UNet (or Flux transformer) with small random
    weights (both A and B), on the layers the trainer targets for the family.

    Written the way the trainer writes a trained LoRA (`trainer.lora_io.save_diffusers`), so the engine
    and `load_lora_weights` read it exactly as they read a real one. The UNet is left without LoRA layers.
    """
    family = family_of(pipe)
    targets = for_family(TrainConfig(family_defaults=("lora_targets",)), family.name).lora_targets
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    unet = family.denoiser(pipe)
    unet.add_adapter(config, adapter_name=SCRATCH_ADAPTER)
    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=generator) * (0.02 if "lora_B" in name else 0.1)
                    param.copy_(noise.to(param.dtype))
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in get_peft_model_state_dict(unet, adapter_name=SCRATCH_ADAPTER).items()}
    finally:
        unet.unload_lora()
    metadata = {"handle": "sks", "class_word": "woman", "rank": str(rank), "alpha": str(rank),
                "base_model": "random"}
    return save_diffusers(out_dir, family, {family.denoiser_name: state}, {family.denoiser_name: config}, metadata)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call takes, the GPU's queued work included."""
    sync(device)
    started = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - started


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class Timing(NamedTuple):
    """Seconds of repeated runs: their median, and the fastest and slowest run. The plain pipeline's
    runs can spread widely on one host (it waits on the CPU that launches its kernels), so the
    spread is printed beside each median."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        return cls(statistics.median(times), min(times), max(times))


def median_of(call: Callable[[int], Any], repeats: int, device: torch.device) -> Timing:
    """`call(i)` timed over `repeats` runs, after one untimed warm-up run."""
    call(-1)
    return Timing.of([timed(lambda i=i: call(i), device) for i in range(repeats)])


def median_then(call: Callable[[int], Any], cleanup: Callable[[int], Any], repeats: int,
                device: torch.device) -> Timing:
    """Like `median_of`, with an untimed `cleanup(i)` after each `call(i)`."""
    times = []
    for i in range(-1, repeats):
        seconds = timed(lambda i=i: call(i), device)
        cleanup(i)
        if i >= 0:
            times.append(seconds)
    return Timing.of(times)


def plain_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """A plain `StableDiffusionPipeline`, or `StableDiffusionXLPipeline` for an SDXL base, over the same
    modules (no safety checker and no invisible watermark: the engine runs neither)."""
    cls = family_of(pipe).pipeline_class
    extra = ({"add_watermarker": False} if cls is StableDiffusionXLPipeline
             else {} if cls is FluxPipeline else {"requires_safety_checker": False})
    modules = {k: v for k, v in pipe.components.items() if k in cls._get_signature_keys(cls)[0]}
    return cls(**modules, **extra)


class Baseline:
    """A plain pipeline over the same modules that loads and unloads the person's LoRA on every request."""

    def __init__(self, pipe: DiffusionPipeline, size: tuple[int, int], steps: int) -> None:
        self.pipe = plain_pipeline(pipe)
        if not family_of(pipe).flow_matching:  # a flow-matching model keeps its own scheduler, as the engine does
            self.pipe.scheduler = SchedulerCache(pipe.scheduler.config).get(DEFAULT_SCHEDULER)
        self.negative = None if family_of(pipe).flow_matching else NEGATIVE
        self.guidance = family_of(pipe).default_guidance
        self.pipe.set_progress_bar_config(disable=True)
        self.width, self.height = size
        self.steps = steps

    def load(self, path: Path) -> None:
        self.pipe.load_lora_weights(str(path))

    def unload(self) -> None:
        self.pipe.unload_lora_weights()

    def generate(self, n: int, seed: int) -> list[bytes]:
        images = self.pipe(prompt=PROMPT, negative_prompt=self.negative, num_images_per_prompt=n,
                           num_inference_steps=self.steps, guidance_scale=self.guidance, width=self.width,
                           height=self.height,
                           generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]).images
        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out

    def request(self, path: Path, n: int, seed: int) -> list[bytes]:
        self.load(path)
        try:
            return self.generate(n, seed)
        finally:
            self.unload()


def report(figures: dict[str, Any], name: str, key: str, timing: Timing) -> None:
    """Keep the median under `key` and the fastest and slowest runs under `key`_range; print them."""
    figures[key], figures[f"{key}_range"] = timing.median, [timing.low, timing.high]
    print(f"{name:<46} {timing.median * 1000:10.1f} ms  (runs {timing.low * 1000:.1f}-{timing.high * 1000:.1f})",
          flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = bench_pipeline(args.model, args.device, quantize=args.quantize)
    device = pipe.device
    engine = GenerationEngine(pipe, max_loaded_adapters=8, compile_blocks=None if args.compile else False,
                              static_shapes=args.static_shapes, base_resolution=args.resolution or None)
    size = engine.image_size("square")
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "model": args.model,
            "dtype": str(engine.family.denoiser(pipe).dtype), "quantize": args.quantize, "width": size[0], "height": size[1],
            "steps": args.steps, "scheduler": "flow-match euler" if engine.family.flow_matching else DEFAULT_SCHEDULER,
            "guidance": engine.family.default_guidance, "rank": args.rank, "repeats": args.repeats,
            "switches": args.switches}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        loras = {user: make_random_lora(pipe, Path(tmp) / user, seed, args.rank)
                 for seed, user in enumerate(USERS)}

        def user(i: int) -> str:
            return USERS[i % len(USERS)]

        # Baseline first: its unload_lora_weights removes every LoRA layer, the engine's would go too.
        baseline: dict[str, Any] = {}
        plain = Baseline(pipe, size, args.steps)
        with plain_layout(pipe):  # the baseline runs the UNet as diffusers loads it (NCHW)
            report(baseline, "base model, no LoRA at all (reference)", "image_no_lora_s",
                   median_of(lambda i: plain.generate(1, max(i, 0)), args.repeats, device))
            report(baseline, "baseline: load_lora_weights", "first_load_s",
                   median_then(lambda i: plain.load(loras[user(i)]), lambda _i: plain.unload(), args.switches,
                               device))
            report(baseline, "baseline: switch (load + unload)", "switch_s",
                   median_of(lambda i: (plain.load(loras[user(i)]), plain.unload()), args.switches, device))
            reset_peak(device)
            report(baseline, "baseline: image (n=1, load+generate+unload)", "image_s",
                   median_of(lambda i: plain.request(loras[user(i)], 1, max(i, 0)), args.repeats, device))
            report(baseline, "baseline: batch of 4 (load+generate+unload)", "batch4_s",
                   median_of(lambda i: plain.request(loras[user(i)], 4, max(i, 0)), args.repeats, device))
            baseline["peak_mib"] = peak_mib(device)
            plain.load(loras[USERS[0]])
            report(baseline, "baseline: image, LoRA kept loaded (reference)", "image_generate_only_s",
                   median_of(lambda i: plain.generate(1, max(i, 0)), args.repeats, device))
            plain.unload()

        ours: dict[str, Any] = {}

        # A person's first request: their file is read and becomes resident (then evicted again).
        report(ours, "ours: first load of a LoRA", "first_load_s",
               median_then(lambda i: engine._load(f"new-{i}", loras[user(i)]),
                           lambda i: engine.evict(f"new-{i}"), args.switches, device))
        resident = {u: engine._load(u, loras[u]) for u in USERS}

        def switch(i: int) -> None:
            with engine._applied(resident[user(i)]):  # merged in, graphs installed, then restored
                pass

        report(ours, "ours: switch (merge a resident LoRA + restore)", "switch_s",
               median_of(switch, args.switches, device))
        ours["warm_up_s"] = engine.warm_up()
        print(f"{'ours: warm-up (compile, capture graphs)':<46} {ours['warm_up_s']:10.1f} s", flush=True)
        reset_peak(device)

        def request(n: int, i: int) -> GenerateRequest:
            # No face pass: the baseline draws the picture alone (bench.face_pass_cost times the pass).
            return GenerateRequest(prompt=PROMPT, negative_prompt=plain.negative or "", num_images=n, seed=max(i, 0),
                                   steps=args.steps, guidance=plain.guidance, face_pass=False)

        def ask(n: int, i: int, on: GenerationEngine = engine) -> list[Any]:
            return on.generate(request(n, i), adapter_key=user(i), lora_path=loras[user(i)])

        report(ours, "ours: image (n=1, person switched)", "image_s",
               median_of(lambda i: ask(1, i), args.repeats, device))
        report(ours, "ours: batch of 4 (person switched)", "batch4_s",
               median_of(lambda i: ask(4, i), args.repeats, device))
        report(ours, "ours: image (n=1), base model, no LoRA", "image_base_s",
               median_of(lambda i: engine.generate(request(1, i)), args.repeats, device))
        ours["peak_mib"] = peak_mib(device)
        ours["resident_adapters"] = len(engine.loaded_adapters)
        ours["graph_capture_s"] = engine.graph_capture_s
        print(f"{'ours: graph capture so far, compiling included':<46} {engine.graph_capture_s * 1000:10.1f} ms",
              flush=True)

        # Quality: the same request through the baseline (PEFT layers, eager) and through the engine.
        mine = [pixels(png) for png in (ask(1, 0)[0].png, ask(4, 1)[0].png)]
        theirs = [pixels(plain.request(loras[user(0)], 1, 0)[0]), pixels(plain.request(loras[user(1)], 4, 1)[0])]
        ours["pixel_diff_vs_baseline"] = [float(np.abs(a - b).mean()) for a, b in zip(mine, theirs, strict=True)]
        print(f"mean |ours - baseline| per pixel (0-255), n=1 and n=4: "
              f"{', '.join(f'{d:.2f}' for d in ours['pixel_diff_vs_baseline'])}", flush=True)
        if args.variants and engine._compiled is not None:
            blocks = GenerationEngine(pipe, compile_stages=False)
            report(ours, "ours, graphs of compiled blocks: image (n=1)", "image_compiled_blocks_s",
                   median_of(lambda i: ask(1, i, blocks), args.repeats, device))
            report(ours, "ours, graphs of compiled blocks: batch of 4", "batch4_compiled_blocks_s",
                   median_of(lambda i: ask(4, i, blocks), args.repeats, device))
            del blocks
            plain_blocks = GenerationEngine(pipe, compile_blocks=False)
            report(ours, "ours, graphs of plain blocks: image (n=1)", "image_plain_blocks_s",
                   median_of(lambda i: ask(1, i, plain_blocks), args.repeats, device))
            report(ours, "ours, graphs of plain blocks: batch of 4", "batch4_plain_blocks_s",
                   median_of(lambda i: ask(4, i, plain_blocks), args.repeats, device))
            ours["pixel_diff_compiled_vs_plain"] = float(np.abs(pixels(ask(1, 0, plain_blocks)[0].png)
                                                                - mine[0]).mean())
            print(f"mean |compiled - plain blocks| per pixel: {ours['pixel_diff_compiled_vs_plain']:.3f}", flush=True)
            del plain_blocks
        if args.variants and engine.graph_capture_s:
            eager = GenerationEngine(pipe, cuda_graphs=False)
            report(ours, "ours without CUDA graphs: image (n=1)", "image_no_graphs_s",
                   median_of(lambda i: ask(1, i, eager), args.repeats, device))
            report(ours, "ours without CUDA graphs: batch of 4", "batch4_no_graphs_s",
                   median_of(lambda i: ask(4, i, eager), args.repeats, device))
            ours["pixel_diff_graphs_vs_eager"] = float(np.abs(pixels(ask(1, 0, eager)[0].png) - mine[0]).mean())
            print(f"mean |graphs - eager| per pixel: {ours['pixel_diff_graphs_vs_eager']:.3f}", flush=True)

    ratios = {key: baseline[key] / ours[key] for key in ("image_s", "batch4_s", "switch_s", "first_load_s")}
    for key, ratio in ratios.items():
        (base_low, base_high), (ours_low, ours_high) = baseline[f"{key}_range"], ours[f"{key}_range"]
        print(f"{key:<14} {ratio:8.2f}x faster (baseline / ours; {base_low / ours_high:.2f}x-"
              f"{base_high / ours_low:.2f}x between the runs' extremes)", flush=True)
    if baseline["peak_mib"] is not None:
        print(f"peak GPU memory: baseline {baseline['peak_mib']:.0f} MiB, ours {ours['peak_mib']:.0f} MiB "
              f"({len(USERS)} adapters resident)", flush=True)
    else:
        print("(no GPU memory figure on CPU)", flush=True)
    return {**info, "baseline": baseline, "ours": ours, "ratios": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random",
                        help="sd15-random, sdxl-random, tiny, tiny-sdxl, a hub id or a folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per image figure")
    parser.add_argument("--switches", type=int, default=20, help="timed LoRA loads and switches")
    parser.add_argument("--rank", type=int, default=16, help="rank of the random LoRAs")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="the QUANTIZE setting: int8 keeps a Flux transformer's weights in int8 (the engine "
                             "adds LoRAs beside them, unmerged; the baseline loads them with PEFT)")
    parser.add_argument("--resolution", type=int, default=0,
                        help="the square pictures' side (default: the base model's, 1024 px for SDXL and Flux)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the engine with compiled blocks, plain blocks and without graphs "
                             "(each compiles or captures again: minutes on a cold GPU cache)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="ours with the UNet's stages and the VAE decoder compiled (--no-compile: CUDA graphs "
                             "of plain blocks, no minutes of compiling)")
    parser.add_argument("--static-shapes", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile, also compile for the static shapes of one and four square pictures "
                             "(as a worker does; --no-static-shapes saves minutes on a cold cache)")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
