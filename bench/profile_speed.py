"""Where the GPU time goes: kernel tables and layout/compiler variants of the training step and the UNet.

For the training step (the trainer's own `TrainingRun.train_step`) and for the denoising UNet call
(batch 2 = one picture with guidance, batch 8 = four), each in one process:

- the kernel-time table of one eager call (`torch.profiler`, top kernels by GPU time) and its total
  GPU time, the floor a CUDA graph can reach;
- ms per call eager, as CUDA graphs, with channels-last weights, and with `torch.compile` under the
  graphs (compile time printed separately);
- the training step in fp16 with loss scaling (for GPUs without bf16) next to bf16;
- `--only regional`: the UNet's ResNet and transformer blocks and the VAE decoder's ResNet blocks
  compiled one by one (trainer.compiled_blocks; `--dynamic` for dynamic shapes), under the graphs,
  with the compile time of each first call; `--only regional-train`: the training step with the
  UNet's ResNet blocks compiled; `--only sdpa-train`: the graphed training step under each of
  PyTorch's attention kernels (stages not compiled, so no variant waits for a compile);
- `--only generate`: the engine end to end, with a CPU profile and where one picture's wall time
  goes (before the first kernel, GPU busy, idle gaps, after the last kernel).

Every variant runs in the same process on the same weights; the first figure of each group is its
baseline. Results also go to `--json`.

    python -m bench.profile_speed --json profile.json          # on a CUDA GPU (sd15-random, 512 px)
    python -m bench.profile_speed --no-compile                 # skip the slow torch.compile variants
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from bench.train_speed import CLASS_WORD, HANDLE, PRIORS, synthetic_photos, time_steps
from jobs.requests import TrainConfig
from trainer import compiled_blocks
from trainer.dreambooth import TrainingRun
from trainer.fused_linears import PASS as FUSE_LINEARS
from trainer.fused_linears import FuseLinearsPass
from trainer.graphs import GraphedCall
from trainer.pipelines import load_pipeline

log = logging.getLogger(__name__)
# The trainings this profile steps through: never at their end, no checkpoints, few class images.
STEP_CONFIG = TrainConfig(steps=10_000, checkpoint_every=0, num_class_images=4, class_image_steps=5, min_photos=1)


def gpu_ms(call: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median ms per call, timed with CUDA events around each call."""
    return statistics.median(time_steps(call, warmup, iters, torch.device("cuda")))


def kernel_table(call: Callable[[], Any], label: str, rows: int) -> float:
    """Print the top kernels of one call by GPU time; return the call's total kernel time in ms."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000
    launches = sum(e.count for e in events if getattr(e, "self_device_time_total", 0) > 0)
    print(f"\n--- {label}: {total_ms:.1f} ms of kernels in one call, {launches} kernels ---")
    key = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=90))
    return total_ms


def new_training(tmp: str, config: TrainConfig) -> TrainingRun:
    """A training of the benchmark's synthetic photos with `config`, its files under `tmp`."""
    return TrainingRun(synthetic_photos(512), HANDLE, CLASS_WORD, config, base_model="sd15-random",
                       out_dir=Path(tmp) / "out", work_dir=Path(tmp) / "work", class_cache_dir=Path(tmp) / "cache",
                       on_event=lambda _e: None, should_cancel=lambda: False, resume_from=None)


def aten_launches(call: Callable[[], Any], label: str, rows: int) -> dict[str, Any]:
    """Print which ATen operators launch kernels in one call of an ungraphed step, by the operator
    that called them, with input shapes: inductor's own kernels are Triton's, so these are its
    fallbacks (attention, convolutions, GEMMs) and the copies they make for their layouts."""
    wrappers = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::empty_like", "aten::to", "aten::_to_copy"}
    call()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        call()
        torch.cuda.synchronize()
    launches: dict[tuple[str, str, str], list[float]] = {}
    for event in prof.events():
        kernel_us = sum(k.duration for k in getattr(event, "kernels", ()))
        if not event.name.startswith("aten::") or not kernel_us:
            continue
        caller = event.cpu_parent
        while caller is not None and caller.name in wrappers:
            caller = caller.cpu_parent
        where = f"{caller.name}{caller.input_shapes}"[:110] if caller is not None else "-"
        row = launches.setdefault((event.name, where, str(event.input_shapes)[:60]), [0, 0.0])
        row[0] += 1
        row[1] += kernel_us
    table = sorted(launches.items(), key=lambda item: -item[1][1])
    print(f"\n--- {label}: kernels launched by ATen operators, by caller ({sum(n for n, _ in launches.values())} ops) ---")
    for (name, where, shapes), (count, us) in table[:rows]:
        print(f"{us / 1000:7.3f} ms {count:4d}x  {name:<34} from {where}  {shapes}")
    return {f"{name} from {where}": {"count": count, "ms": us / 1000} for (name, where, _), (count, us) in table}


def time_training(pipe, tmp: str, config: TrainConfig, name: str, results: dict[str, Any],
                  args: argparse.Namespace, profile: bool = False, trace: bool = False) -> None:
    """Median ms per step of a fresh training with `config` (and its kernel table if `profile`, its
    ATen launches if `trace`), with its peak memory and how long its first step took (capture, and
    compile if any)."""
    trainer = new_training(tmp, config)
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    with trainer.session(pipe):
        trainer.train_step()
        first_s = time.monotonic() - started
        if profile:
            results[f"{name} kernel ms"] = kernel_table(trainer.train_step, name, args.rows)
        if trace:
            results[f"{name} aten launches"] = aten_launches(trainer.train_step, name, args.rows)
        ms = statistics.median(time_steps(trainer.train_step, 3, args.steps, pipe.device))
    results[name] = {"ms": ms, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "prepare_and_first_step_s": first_s, "capture_s": trainer.capture_s}
    print(f"{name:<52} {ms:8.2f} ms/step  peak {results[name]['peak_mib']:.0f} MiB  "
          f"first step after {first_s:.1f} s", flush=True)


def train_variants(pipe, args: argparse.Namespace, out: dict[str, Any], only_default: bool = False) -> None:
    results = out.setdefault("train regional" if only_default else "train", {})
    with tempfile.TemporaryDirectory() as tmp:
        def run(config: TrainConfig, name: str, profile: bool = False) -> None:
            time_training(pipe, tmp, config, name, results, args, profile)

        base = STEP_CONFIG
        plain = replace(base, prior_preservation=False)
        if only_default:
            started = time.monotonic()
            run(plain, "train no prior, graphs, compiled resnets")
            results["compile + first step s"] = time.monotonic() - started
            run(base, "train prior, graphs, compiled resnets")
            return
        pipe.unet.to(memory_format=torch.contiguous_format)
        run(plain, "train no prior, graphs, NCHW")
        run(replace(plain, cuda_graphs=False), "train no prior, eager, NCHW", profile=True)
        pipe.unet.to(memory_format=torch.channels_last)  # the project's default on CUDA
        run(plain, "train no prior, graphs")
        run(replace(plain, cuda_graphs=False), "train no prior, eager", profile=True)
        run(base, "train prior, graphs")
        run(replace(plain, mixed_precision="fp16"), "train no prior, fp16 + scaler")
        if args.compile:
            started = time.monotonic()
            pipe.unet.compile()
            try:
                run(plain, "train no prior, graphs, torch.compile")
            except Exception as exc:  # a benchmark variant may fail; the others still report
                print(f"train with torch.compile failed: {type(exc).__name__}: {exc}", flush=True)
            results["compile + first step s"] = time.monotonic() - started
            pipe.unet._compiled_call_impl = None


def train_compiled(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The default training step (stages compiled for static shapes, linears sharing an input
    fused) against plain stages and against compiled stages without the fused linears; the kernel
    table of the default step. A variant's first compile is its first step's time. `--variants`
    picks among those (`plain`, `default`, `apart`) and adds `trace` (the ATen operators launching
    kernels in the default step run without graphs), `convolutions` (the default pass without its
    1x1 convolutions made linears) and `nchw` (the default step with the UNet's weights NCHW instead
    of channels-last)."""
    results = out.setdefault("train compiled", {})
    with tempfile.TemporaryDirectory() as tmp:
        for prior in sorted(PRIORS[args.prior]):  # without prior preservation first
            config, label = replace(STEP_CONFIG, prior_preservation=prior), "prior" if prior else "no prior"

            def run(config: TrainConfig, variant: str, label: str = label, **kwargs: bool) -> None:
                time_training(pipe, tmp, config, f"train {label}, {variant}", results, args, **kwargs)

            if "plain" in args.variants:
                run(replace(config, compiled_stages=False), "plain stages")
            if "default" in args.variants:
                fused_before, convs_before = FUSE_LINEARS.groups, FUSE_LINEARS.convolutions_replaced
                run(config, "compiled stages, fused linears", profile=True)
                results[f"train {label}: groups of linears fused"] = FUSE_LINEARS.groups - fused_before
                results[f"train {label}: 1x1 convolutions made linears"] = FUSE_LINEARS.convolutions_replaced - convs_before
                print(f"{'':<52} groups of linears fused: {FUSE_LINEARS.groups - fused_before}, 1x1 convolutions "
                      f"made linears: {FUSE_LINEARS.convolutions_replaced - convs_before}", flush=True)
            if "trace" in args.variants:
                run(replace(config, cuda_graphs=False, compiled_stages=True), "compiled stages, no graphs", trace=True)
            if "apart" in args.variants:
                run(replace(config, fused_linears=False), "compiled stages, linears apart")
            if "convolutions" in args.variants:
                with mock.patch.object(compiled_blocks, "FUSE_LINEARS", FuseLinearsPass(convolutions=False)):
                    run(config, "compiled stages, fused linears, 1x1 convolutions kept")
            if "nchw" in args.variants:
                pipe.unet.to(memory_format=torch.contiguous_format)
                try:
                    run(config, "compiled stages, fused linears, NCHW weights", profile=True)
                finally:
                    pipe.unet.to(memory_format=torch.channels_last)  # the project's default on CUDA


def unet_variants(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    results = out.setdefault("unet", {})
    pipe.unet.eval()
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for batch in (2, 8):
            unet_batch(pipe.unet, batch, g, args, results)
            vae_batch(pipe.vae, batch // 2, g, results)
        ids = torch.randint(0, 1000, (1, 77), device="cuda")
        results["text encoder eager"] = gpu_ms(lambda: pipe.text_encoder(ids))
    print(f"{'text encoder eager':<44} {results['text encoder eager']:8.2f} ms", flush=True)


def unet_batch(unet: torch.nn.Module, batch: int, g: torch.Generator, args: argparse.Namespace,
               results: dict[str, Any]) -> None:
    """One denoising call at `batch` (2 per picture with guidance), 512 px: eager, graphs, layouts, compile."""
    x = torch.randn(batch, 4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor(500, device="cuda")
    ehs = torch.randn(batch, 77, 768, device="cuda", generator=g, dtype=torch.bfloat16)

    def call(fn: Callable[..., Any] = unet.forward) -> Any:
        return fn(x, t, encoder_hidden_states=ehs, return_dict=False)

    def measure(name: str, fn: Callable[..., Any]) -> None:
        results[name] = gpu_ms(lambda: call(fn))
        print(f"{name:<44} {results[name]:8.2f} ms", flush=True)

    unet.to(memory_format=torch.contiguous_format)
    measure(f"UNet b{batch} eager, NCHW", unet.forward)
    if batch == 2:
        results[f"UNet b{batch} NCHW kernel ms"] = kernel_table(call, f"UNet b{batch} NCHW", args.rows)
    measure(f"UNet b{batch} graphs, NCHW", GraphedCall(unet.forward, unet, name="UNet"))
    unet.to(memory_format=torch.channels_last)  # the project's default on CUDA
    measure(f"UNet b{batch} graphs, channels-last", GraphedCall(unet.forward, unet, name="UNet"))
    if batch == 2:
        results[f"UNet b{batch} channels-last kernel ms"] = kernel_table(call, f"UNet b{batch} channels-last",
                                                                         args.rows)
    if args.compile:
        started = time.monotonic()
        try:
            compiled = torch.compile(unet.forward)
            call(compiled)
            graphed = GraphedCall(compiled, unet, name="UNet compiled")
            call(graphed)
            results[f"UNet b{batch} compile + capture s"] = time.monotonic() - started
            measure(f"UNet b{batch} graphs, torch.compile", graphed)
        except Exception as exc:  # a benchmark variant may fail; the others still report
            print(f"UNet b{batch} with torch.compile failed: {type(exc).__name__}: {exc}", flush=True)
        unet.to(memory_format=torch.channels_last)


def vae_batch(vae: torch.nn.Module, n: int, g: torch.Generator, results: dict[str, Any]) -> None:
    """Decoding `n` 512 px pictures: eager, graphs, graphs with channels-last weights."""
    z = torch.randn(n, 4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)

    def measure(name: str, fn: Callable[..., Any]) -> None:
        results[name] = gpu_ms(lambda: fn(z, return_dict=False))
        print(f"{name:<44} {results[name]:8.2f} ms", flush=True)

    measure(f"VAE decode x{n} eager", vae.decode)
    measure(f"VAE decode x{n} graphs", GraphedCall(vae.decode, vae, name="VAE"))
    vae.to(memory_format=torch.channels_last)
    measure(f"VAE decode x{n} graphs, channels-last", GraphedCall(vae.decode, vae, name="VAE"))
    vae.to(memory_format=torch.contiguous_format)


def compile_blocks(module: torch.nn.Module, classes: tuple[type, ...], dynamic: bool | None) -> int:
    """`torch.compile` each submodule of the given classes in place (regional compilation)."""
    torch._dynamo.config.cache_size_limit = 64  # one compiled variant per block kind and shape
    blocks = [m for m in module.modules() if isinstance(m, classes)]
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def uncompile(module: torch.nn.Module) -> None:
    for m in module.modules():
        m._compiled_call_impl = None


def regional_variants(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Regional `torch.compile` of the ResNet and transformer blocks, under the graphs."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    results = out.setdefault("regional", {})
    g = torch.Generator("cuda").manual_seed(0)
    unet, vae = pipe.unet, pipe.vae
    unet.eval()

    def measure(name: str, graphed: GraphedCall, *call_args: Any, **kwargs: Any) -> None:
        started = time.monotonic()
        graphed(*call_args, **kwargs)
        results[f"{name} compile + capture s"] = time.monotonic() - started
        results[name] = gpu_ms(lambda: graphed(*call_args, **kwargs))
        print(f"{name:<64} {results[name]:8.2f} ms  (compile + capture "
              f"{results[f'{name} compile + capture s']:.1f} s)", flush=True)

    tag = f"dynamic={args.dynamic}"
    results["UNet blocks"] = compile_blocks(unet, (ResnetBlock2D, BasicTransformerBlock), args.dynamic)
    with torch.no_grad():
        for batch, (h, w) in ((2, (64, 64)), (8, (64, 64)), (2, (96, 64))):
            x = torch.randn(batch, 4, h, w, device="cuda", generator=g, dtype=torch.bfloat16)
            t = torch.tensor(500, device="cuda")
            ehs = torch.randn(batch, 77, 768, device="cuda", generator=g, dtype=torch.bfloat16)
            measure(f"UNet b{batch} {h * 8}x{w * 8} graphs, compiled blocks, {tag}",
                    GraphedCall(unet.forward, unet, name="UNet"), x, t, encoder_hidden_states=ehs, return_dict=False)
    uncompile(unet)
    compile_blocks(vae, (ResnetBlock2D,), args.dynamic)
    with torch.no_grad():
        for n in (1, 4):
            z = torch.randn(n, 4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
            measure(f"VAE decode x{n} graphs, compiled resnets, {tag}", GraphedCall(vae.decode, vae, name="VAE"),
                    z, return_dict=False)
    uncompile(vae)


def regional_train(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    out["UNet train: blocks"] = compile_blocks(pipe.unet, (ResnetBlock2D,), args.dynamic)
    train_variants(pipe, args, out, only_default=True)
    uncompile(pipe.unet)


def sdpa_train(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The graphed step with each scaled-dot-product-attention backend; the first, PyTorch's own
    choice, is the baseline. Inductor calls the same attention kernels, so this holds compiled too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = out.setdefault("sdpa train", {})
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    base = replace(STEP_CONFIG, compiled_stages=False)
    with tempfile.TemporaryDirectory() as tmp:
        for config, label in ((replace(base, prior_preservation=False), "no prior"), (base, "prior")):
            for name, backend in backends.items():
                trainer = new_training(tmp, config)
                key = f"train {label}, graphs, attention {name}"
                try:
                    with trainer.session(pipe), sdpa_kernel(backend) if backend else contextlib.nullcontext():
                        results[key] = statistics.median(time_steps(trainer.train_step, 3, args.steps, pipe.device))
                except RuntimeError as exc:  # a backend may not support these shapes
                    print(f"{key:<52} failed: {exc}", flush=True)
                    continue
                ratio = results[f"train {label}, graphs, attention default"] / results[key]
                print(f"{key:<52} {results[key]:8.2f} ms/step  ({ratio:.2f}x default)", flush=True)


# First match wins: inductor's Triton kernels are named for the operators they fuse ("convolution").
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
                ("fused (Triton)", ("triton",)),
                ("convolution", ("fprop", "implicit_gemm", "conv", "nhwc", "nchw", "winograd")),
                ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "mm_")))


def kernel_kinds(call: Callable[[], Any]) -> dict[str, float]:
    """ms of kernels in one call by kind (attention, convolution, GEMM, inductor's Triton kernels,
    other), from the kernels' names."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0)
        if not us:
            continue
        name = event.key.lower()
        kind = next((kind for kind, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1000
    return kinds


def attention_backends(batch: int, g: torch.Generator, results: dict[str, Any]) -> None:
    """Each of PyTorch's attention kernels on SD1.5's attention shapes at 512 px (8 heads; self- and
    cross-attention at each resolution), ms per call; the first backend, PyTorch's choice, is the
    baseline."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for tokens, head_dim in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
        for keys, kind in ((tokens, "self"), (77, "cross")):
            q = torch.randn(batch, 8, tokens, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, 8, keys, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
                    for _ in range(2))
            line = []
            for name, backend in backends.items():
                key = f"sdpa b{batch} {kind} {tokens}x{keys} d{head_dim} {name}"
                try:
                    with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                        results[key] = gpu_ms(functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v))
                except RuntimeError:  # a backend may not support these shapes
                    line.append(f"{name} -")
                    continue
                line.append(f"{name} {results[key] * 1000:.0f} us")
            print(f"sdpa b{batch} {kind:<5} {tokens:>4}x{keys:<4} d{head_dim:<3} " + ", ".join(line), flush=True)


# Generation variants of `--only unet-stages`: (graph pass, inductor settings, dynamic shapes).
STAGE_VARIANTS: dict[str, tuple[Any, dict[str, Any], bool]] = {
    "static": (None, {}, False),
    "fused": (FUSE_LINEARS, {}, False),
    "coordinate": (FUSE_LINEARS, {"coordinate_descent_tuning": True}, False),
    "autotune": (FUSE_LINEARS, {"max_autotune": True}, False),
    "dynamic": (None, {}, True),
    "fused-dynamic": (FUSE_LINEARS, {}, True),
}


def unet_stage_variants(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The denoising call of four pictures (batch 8, 512 px; `--batch`) with the stages compiled,
    under CUDA graphs: the attention kernels alone, then each of `--variants` (STAGE_VARIANTS, the
    first is the baseline) with its compile time, ms per call and kernel time by kind."""
    results = out.setdefault("unet stages", {})
    unet = pipe.unet
    unet.eval()
    g = torch.Generator("cuda").manual_seed(0)
    batch = args.batch
    attention_backends(batch, g, results)
    x = torch.randn(batch, 4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor(500, device="cuda")
    ehs = torch.randn(batch, 77, 768, device="cuda", generator=g, dtype=torch.bfloat16)
    baseline = None
    for name in [v for v in STAGE_VARIANTS if v in args.variants]:
        graph_pass, options, dynamic = STAGE_VARIANTS[name]
        regions = compiled_blocks.CompiledBlocks(pipe, dynamic=dynamic, graph_pass=graph_pass, options=options)
        label = f"UNet b{batch} stages {name}"
        with torch.no_grad(), regions.installed():
            graphed = GraphedCall(unet.forward, unet, name=label)

            def call(graphed: GraphedCall = graphed) -> Any:
                return graphed(x, t, encoder_hidden_states=ehs, return_dict=False)

            started = time.monotonic()
            try:
                reference = call()[0].float()
            except Exception as exc:  # a variant may fail to compile; the others still report
                print(f"{label} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            compile_s = time.monotonic() - started
            ms = gpu_ms(call)
            kinds = kernel_kinds(call)
            if args.rows:
                kernel_table(call, label, args.rows)
            del graphed  # its graph's memory
        baseline = baseline or (name, ms, reference)
        diff = (reference - baseline[2]).abs().mean().item()
        results[name] = {"ms": ms, "compile_and_capture_s": compile_s, "kernel ms by kind": kinds,
                         "mean abs diff vs first": diff}
        print(f"{label:<40} {ms:8.2f} ms ({baseline[1] / ms:.2f}x {baseline[0]})  compile + capture "
              f"{compile_s:.1f} s  |out - first| {diff:.4f}  kernels: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])), flush=True)


def generate_variants(pipe, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The engine end to end: warm-up, then 25-step pictures, and where one picture's time goes."""
    from jobs.requests import GenerateRequest
    from trainer.engine import GenerationEngine

    results = out.setdefault("generate", {})
    engine = GenerationEngine(pipe)
    results["warm-up s"] = engine.warm_up()
    print(f"{'engine warm-up':<44} {results['warm-up s']:8.1f} s", flush=True)
    for n, aspect in ((1, "square"), (4, "square"), *([(1, "portrait")] if args.portrait else [])):
        request = GenerateRequest(prompt="a photo of a woman on a beach", num_images=n, seed=1, steps=25, face_pass=False,
                                  aspect=aspect)
        started = time.monotonic()
        engine.generate(request)
        first = time.monotonic() - started
        name = f"engine n={n} {aspect}"
        results[name] = {"s": median_request_s(engine, request), "first_s": first}
        print(f"{name:<44} {results[name]['s'] * 1000:8.1f} ms (first {first:.2f} s)", flush=True)
    dynamic_only(engine, results)
    request = GenerateRequest(prompt="a photo of a woman on a beach", seed=1, steps=25, face_pass=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(request)
        torch.cuda.synchronize()
    events = prof.key_averages()
    results["n=1 kernel ms"] = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000
    print(f"\n--- one n=1 picture: {results['n=1 kernel ms']:.1f} ms of kernels; top CPU ---")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print("\n--- the same picture: top kernels ---")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    results["n=1 timeline ms"] = gpu_timeline(prof)
    print("one n=1 picture on the GPU's clock (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                  results["n=1 timeline ms"].items()))


def median_request_s(engine: Any, request: Any, repeats: int = 3) -> float:
    """Median seconds of `repeats` requests to the engine, timed as `bench.generate_speed` times them."""
    from bench.generate_speed import timed

    device = torch.device("cuda")
    return statistics.median(timed(lambda: engine.generate(request), device) for _ in range(repeats))


def dynamic_only(engine: Any, results: dict[str, Any]) -> None:
    """The engine's square pictures with graphs captured from the dynamic-shape code (as before the
    warm-up compiled static shapes) against those from the static-shape code, in the same process;
    with the mean pixel difference of the same request's pictures."""
    from bench.generate_speed import pixels
    from jobs.requests import GenerateRequest

    def timed(n: int) -> tuple[float, list[Any]]:
        request = GenerateRequest(prompt="a photo of a woman on a beach", num_images=n, seed=1, steps=25, face_pass=False)
        images = engine.generate(request)
        return median_request_s(engine, request), images

    def recapture() -> None:
        engine._graphs.unet.clear()
        engine._graphs.decode.clear()

    for n in (1, 4):
        static_s, static_images = timed(n)
        recapture()
        with mock.patch.object(engine._compiled, "installed", functools.partial(engine._compiled.installed,
                                                                                 static=False)):
            dynamic_s, dynamic_images = timed(n)
        recapture()
        diff = float(np.mean([np.abs(pixels(a.png) - pixels(b.png)).mean()
                              for a, b in zip(static_images, dynamic_images, strict=True)]))
        results[f"engine n={n} square, static vs dynamic"] = {"static s": static_s, "dynamic s": dynamic_s,
                                                             "mean abs pixel diff": diff}
        print(f"engine n={n} square: static shapes {static_s * 1000:.1f} ms, dynamic shapes {dynamic_s * 1000:.1f} ms "
              f"({dynamic_s / static_s:.3f}x), mean |static - dynamic| {diff:.2f} of 255", flush=True)


def gpu_timeline(prof: torch.profiler.profile) -> dict[str, float]:
    """Where a profiled call's wall time went: before the GPU's first kernel, GPU busy, idle gaps
    between kernels, and after the last kernel (host work the GPU waits for)."""
    from torch.autograd import DeviceType

    events = prof.events()
    host = [e.time_range for e in events if e.device_type == DeviceType.CPU]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    begin, end = min(r.start for r in host), max(r.end for r in host)
    busy, idle, reach = 0.0, 0.0, kernels[0][0]
    for start, stop in kernels:
        if start > reach:
            idle += start - reach
        busy += max(0.0, stop - max(start, reach))
        reach = max(reach, stop)
    return {"wall": (end - begin) / 1000, "before first kernel": (kernels[0][0] - begin) / 1000,
            "GPU busy": busy / 1000, "idle between kernels": idle / 1000, "after last kernel": (end - reach) / 1000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    parser.add_argument("--rows", type=int, default=18, help="kernels per table")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--only", choices=("train", "unet", "generate", "regional", "regional-train", "sdpa-train",
                                           "train-compiled", "unet-stages"),
                        help="one part only")
    parser.add_argument("--dynamic", action="store_true", default=None)
    parser.add_argument("--prior", choices=tuple(PRIORS), default="both",
                        help="train-compiled: with prior preservation, without, or both")
    parser.add_argument("--variants", type=lambda text: set(text.split(",")), default=None,
                        help="train-compiled: comma-separated, of plain, default, apart, trace, convolutions, nchw "
                             "(default: plain,default,apart); unet-stages: of " + ",".join(STAGE_VARIANTS)
                             + " (default: static,fused)")
    parser.add_argument("--batch", type=int, default=8, help="unet-stages: UNet batch (2 per picture)")
    parser.add_argument("--portrait", action=argparse.BooleanOptionalAction, default=True,
                        help="generate: also a portrait picture (its first request compiles its shape)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = {"static", "fused"} if args.only == "unet-stages" else {"plain", "default", "apart"}
    if not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU")
    logging.basicConfig(level=logging.WARNING)
    pipe = load_pipeline("sd15-random", device="cuda", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        if args.only in (None, "unet"):
            unet_variants(pipe, args, out)
        if args.only in (None, "generate"):
            generate_variants(pipe, args, out)
        if args.only == "regional":
            regional_variants(pipe, args, out)
        if args.only == "regional-train":
            regional_train(pipe, args, out)
        if args.only == "sdpa-train":
            sdpa_train(pipe, args, out)
        if args.only == "train-compiled":
            train_compiled(pipe, args, out)
        if args.only == "unet-stages":
            unet_stage_variants(pipe, args, out)
        if args.only in (None, "train"):
            train_variants(pipe, args, out)
    finally:
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
