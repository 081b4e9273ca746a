"""GPU-only checks on the full-size random SD1.5 (and SDXL) architectures (run through bench/run_device.sh).

These need CUDA and are skipped elsewhere; the CPU suite covers the same behaviour on `tiny`.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from tests.photos_factory import colour_fields, encode

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")]


@pytest.fixture(scope="module")
def pipe():
    from trainer.pipelines import build_random_pipeline

    return build_random_pipeline("sd15-random", device="cuda", dtype=torch.bfloat16)


def _photos(n: int = 5) -> list[bytes]:
    return [encode(photo, "PNG") for photo in colour_fields(n, 512)]


def test_train_then_generate_on_gpu(pipe, tmp_path):
    from jobs.requests import GenerateRequest, TrainConfig
    from trainer.dreambooth import train
    from trainer.engine import GenerationEngine

    config = TrainConfig(steps=20, num_class_images=2, class_image_steps=5, checkpoint_every=10)
    seen: list[dict] = []
    result = train(_photos(), "zqjane", "woman", config, pipeline=pipe, base_model="sd15-random",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "ckpt", class_cache_dir=tmp_path / "classes",
                   device="cuda", on_event=seen.append)
    assert result.steps == 20 and math.isfinite(result.final_loss)
    assert result.lora_path.is_file()
    assert any(e.type == "checkpoint_saved" for e in seen)
    assert torch.cuda.max_memory_allocated() < 10 * 2**30

    engine = GenerationEngine(pipe)
    images = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=10, num_images=2),
                             adapter_key="jane", lora_path=result.lora_path, handle="zqjane", class_word="woman")
    assert [im.seed for im in images] == [3, 4]
    assert Image.open(io.BytesIO(images[0].png)).size == (512, 512)
    base = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=10), handle="zqjane",
                           class_word="woman")
    assert base[0].png != images[0].png


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_graph_steps_train_like_eager_steps(pipe, tmp_path, precision):
    """The graphed step (TrainConfig.cuda_graphs, the GPU default) computes what the eager step does,
    also in fp16, where the loss scale enters the graphed backward."""
    from dataclasses import replace

    from jobs.requests import TrainConfig
    from trainer.dreambooth import train

    config = TrainConfig(steps=12, prior_preservation=False, checkpoint_every=0, mixed_precision=precision)
    losses = {}
    for graphs in (True, False):
        result = train(_photos(), "zqjane", "woman", replace(config, cuda_graphs=graphs), pipeline=pipe,
                       base_model="sd15-random", out_dir=tmp_path / f"out{graphs}", work_dir=tmp_path / f"w{graphs}",
                       class_cache_dir=tmp_path / "classes", device="cuda")
        losses[graphs] = torch.tensor(result.losses)
    assert len(set(losses[True].tolist())) > 1  # a fresh loss every step, not one replayed output
    assert torch.allclose(losses[True], losses[False], rtol=2e-2, atol=1e-3), (losses[True], losses[False])


def test_generations_between_graphed_steps_leave_the_training_unchanged(pipe, tmp_path):
    """A worker serves /imagine between the (CUDA-graphed) steps of a training on the same pipeline."""
    from jobs.requests import GenerateRequest, TrainConfig
    from trainer.adapters import holds_adapters
    from trainer.dreambooth import train
    from trainer.engine import GenerationEngine

    config = TrainConfig(steps=6, prior_preservation=False, checkpoint_every=0)
    first = train(_photos(), "zqjane", "woman", config, pipeline=pipe, base_model="sd15-random",
                  out_dir=tmp_path / "first", work_dir=tmp_path / "w1", class_cache_dir=tmp_path / "c", device="cuda")
    plain = train(_photos(), "zqbob", "man", config, pipeline=pipe, base_model="sd15-random",
                  out_dir=tmp_path / "plain", work_dir=tmp_path / "w2", class_cache_dir=tmp_path / "c", device="cuda")
    engine = GenerationEngine(pipe)
    request = GenerateRequest(prompt="on the moon", seed=1, steps=4)
    pair = GenerateRequest(prompt="on the moon", seed=1, steps=4, num_images=2)
    served, pairs = [], []

    def serve() -> None:
        # One picture: its graph is captured at the first call (while caching, before the adapters
        # are added) and replayed next to them. Two: captured next to the adapters (blocks holding
        # them plain).
        served.append(engine.generate(request, adapter_key="jane", lora_path=first.lora_path, handle="zqjane",
                                      class_word="woman")[0].png)
        if holds_adapters(pipe.unet):
            pairs.append(engine.generate(pair, adapter_key="jane", handle="zqjane", class_word="woman")[1].png)

    shared = train(_photos(), "zqbob", "man", config, pipeline=pipe, base_model="sd15-random",
                   out_dir=tmp_path / "shared", work_dir=tmp_path / "w3", class_cache_dir=tmp_path / "c",
                   device="cuda", serve_riders=serve)
    def pixels(png: bytes) -> torch.Tensor:
        return torch.tensor(list(Image.open(io.BytesIO(png)).convert("L").getdata()), dtype=torch.float32)

    # The same picture every time (within GPU nondeterminism): the adapters were restored each time.
    # Served while caching, before each step and after the last (tests/trainer/test_serving_between_phases.py).
    assert len(served) > config.steps and all((pixels(p) - pixels(served[0])).abs().mean() < 2 for p in served)
    assert torch.allclose(torch.tensor(shared.losses), torch.tensor(plain.losses), rtol=2e-2, atol=1e-3)
    again = engine.generate(request, adapter_key="jane", handle="zqjane", class_word="woman")[0].png
    assert (pixels(again) - pixels(served[0])).abs().mean() < 2
    # Replaying the graph captured next to the adapters, and capturing afresh outside the training.
    again = engine.generate(pair, adapter_key="jane", handle="zqjane", class_word="woman")[1].png
    assert len(pairs) == config.steps + 1 and all((pixels(p) - pixels(again)).abs().mean() < 2 for p in pairs)
    assert engine._graphs.unet.reuse == ()  # back outside the training


@pytest.mark.parametrize("compiled", [False, True], ids=["plain blocks", "compiled blocks"])
def test_graphed_generation_draws_what_eager_generation_draws_for_each_person(pipe, tmp_path, compiled):
    """The engine's CUDA graphs (captured once, then replayed with anyone's merged LoRA) change nothing,
    and neither do the inductor-compiled stages they are captured from (the default), beyond bf16
    rounding: those of the warm-up's square picture compiled for static shapes, with fused linears."""
    from bench.generate_speed import make_random_lora
    from jobs.requests import GenerateRequest
    from trainer.engine import GenerationEngine

    loras = {name: make_random_lora(pipe, tmp_path / name, seed, rank=16) for seed, name in enumerate("ab")}
    graphed, eager = GenerationEngine(pipe, compile_blocks=compiled), GenerationEngine(pipe, cuda_graphs=False)
    assert (graphed._compiled is not None) is compiled and eager._compiled is None
    if compiled:
        graphed.warm_up(counts=(1,))
        assert all(region.forward.shapes for region in graphed._compiled.regions[:-1])  # the UNet's stages
    request = GenerateRequest(prompt="on the moon", seed=5, steps=8)

    def pixels(png: bytes) -> torch.Tensor:
        return torch.tensor(list(Image.open(io.BytesIO(png)).convert("L").getdata()), dtype=torch.float32)

    seen = {}
    for key in ("a", "b", "a", None):
        fast = graphed.generate(request, adapter_key=key, lora_path=loras.get(key))[0].png
        slow = eager.generate(request, adapter_key=key, lora_path=loras.get(key))[0].png
        difference = (pixels(fast) - pixels(slow)).abs().mean().item()
        assert difference < (1.5 if compiled else 1.0), (key, difference)
        seen.setdefault(key, fast)
    assert graphed.graph_capture_s > 0 and eager.graph_capture_s == 0
    assert (pixels(seen["a"]) - pixels(seen["b"])).abs().mean() > 2  # the graph follows the person
    assert (pixels(seen["a"]) - pixels(seen[None])).abs().mean() > 2


def test_sdxl_trains_at_its_own_size_within_a_24_gb_card_and_draws_its_buckets(tmp_path):
    """SDXL base 1.0's architecture: a training left to the family's settings runs at 1024 px, with
    gradient checkpointing within what a 24 GB card holds (the whole pipeline included), and
    portraits come out at SDXL's trained 832x1216."""
    from jobs.requests import GenerateRequest, TrainConfig
    from jobs.train_defaults import left_to_family
    from trainer.dreambooth import train
    from trainer.engine import GenerationEngine
    from trainer.pipelines import build_random_pipeline

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    others = torch.cuda.memory_allocated()  # other tests' models, still held by their fixtures
    xl = build_random_pipeline("sdxl-random", device="cuda", dtype=torch.bfloat16)
    config = TrainConfig(steps=4, num_class_images=1, class_image_steps=2, checkpoint_every=0,
                         gradient_checkpointing=True, family_defaults=left_to_family({}))
    result = train(_photos(), "zqjane", "woman", config, pipeline=xl, base_model="sdxl-random",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "w", class_cache_dir=tmp_path / "c", device="cuda")
    assert result.metadata["resolution"] == "1024" and math.isfinite(result.final_loss)
    # The pipeline and the training's peak together leave a 24 GB card room for the CUDA context.
    assert torch.cuda.max_memory_allocated() - others < 22 * 2**30

    engine = GenerationEngine(xl, compile_blocks=False)
    images = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=4, aspect="portrait"),
                             adapter_key="jane", lora_path=result.lora_path, handle="zqjane", class_word="woman")
    assert Image.open(io.BytesIO(images[0].png)).size == (832, 1216)
    del engine, xl
    torch.cuda.empty_cache()


def test_flux_trains_at_its_own_size_and_draws_with_the_lora(tmp_path):
    """FLUX.1-dev's architecture (random weights, bf16; about 34 GB with T5-XXL): a training left to
    the family's settings runs at 1024 px on the transformer's attention and feed-forwards, without
    prior preservation, eagerly, within an 80 GB card; the engine then draws with the LoRA merged.
    Its peak memory is logged, for README's memory section (run with --log-cli-level=INFO)."""
    import logging

    from jobs.requests import GenerateRequest, TrainConfig
    from jobs.train_defaults import left_to_family
    from trainer.dreambooth import train
    from trainer.engine import GenerationEngine
    from trainer.pipelines import build_random_pipeline

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    others = torch.cuda.memory_allocated()
    flux = build_random_pipeline("flux-random", device="cuda", dtype=torch.bfloat16)
    config = TrainConfig(steps=3, checkpoint_every=0, gradient_checkpointing=True, family_defaults=left_to_family({}))
    result = train(_photos(), "zqjane", "woman", config, pipeline=flux, base_model="flux-random",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "w", class_cache_dir=tmp_path / "c", device="cuda")
    assert result.metadata["resolution"] == "1024" and result.metadata["family"] == "flux"
    assert math.isfinite(result.final_loss)
    peak = torch.cuda.max_memory_allocated() - others
    logging.getLogger(__name__).info("measured: flux-random training peak %.1f GiB", peak / 2**30)
    assert peak < 78 * 2**30
    engine = GenerationEngine(flux)
    images = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=4, guidance=3.5),
                             adapter_key="jane", lora_path=result.lora_path, handle="zqjane", class_word="woman")
    assert Image.open(io.BytesIO(images[0].png)).size == (1024, 1024)
    del engine, flux
    torch.cuda.empty_cache()


def test_flux_in_int8_trains_at_512_px_within_a_24_gb_card(tmp_path):
    """QUANTIZE=int8 on FLUX.1-dev's architecture: a 512 px training (gradient checkpointing comes with
    int8 weights, the text encoders and the VAE parked for the steps) must peak within what a 24 GB card
    offers (22 GiB, its CUDA context aside), and a picture is drawn with the LoRA beside the int8 weights.
    The random model is built in bf16 on this larger card and quantised there (a real one is quantised
    layer by layer as it loads); the peak counted starts after that. Logged for README (--log-cli-level=INFO)."""
    import logging

    from jobs.requests import GenerateRequest, TrainConfig
    from jobs.train_defaults import left_to_family
    from trainer.dreambooth import train
    from trainer.engine import GenerationEngine
    from trainer.pipelines import load_pipeline
    from trainer.quantization import holds_quantized

    torch.cuda.empty_cache()
    others = torch.cuda.memory_allocated()
    flux = load_pipeline("flux-random", device="cuda", dtype=torch.bfloat16, quantize="int8")
    assert holds_quantized(flux.transformer)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    chosen = {"resolution": 512}
    config = TrainConfig(steps=3, checkpoint_every=0, **chosen, family_defaults=left_to_family(chosen))
    result = train(_photos(), "zqjane", "woman", config, pipeline=flux, base_model="flux-random",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "w", class_cache_dir=tmp_path / "c", device="cuda")
    assert math.isfinite(result.final_loss)
    peak = torch.cuda.max_memory_allocated() - others
    logging.getLogger(__name__).info("measured: flux-random int8 training peak at 512 px %.1f GiB", peak / 2**30)
    engine = GenerationEngine(flux, base_resolution=512)
    torch.cuda.reset_peak_memory_stats()
    images = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=4, guidance=3.5),
                             adapter_key="jane", lora_path=result.lora_path, handle="zqjane", class_word="woman")
    drawing = torch.cuda.max_memory_allocated() - others
    logging.getLogger(__name__).info("measured: flux-random int8 picture peak at 512 px %.1f GiB", drawing / 2**30)
    assert Image.open(io.BytesIO(images[0].png)).size == (512, 512)
    assert peak < 22 * 2**30 and drawing < 22 * 2**30
    del engine, flux
    torch.cuda.empty_cache()


@pytest.mark.worker_start
def test_a_gpu_worker_serves_at_once_and_reaches_compiled_code_in_the_background(tmp_path):
    """What a worker's start compiles, and nothing more (run alone: `-m worker_start`, within one
    10-minute device call on an H100/H200 with a cold cache): a picture is served right after the
    model is loaded, before the compiling has ended, and the same picture afterwards comes from the
    compiled code, close to the uncompiled one."""
    import numpy as np

    from jobs import events
    from jobs.payloads import GenerateInputs, GenerateParams, WorkItem
    from jobs.requests import GenerateRequest
    from jobs.worker_config import WorkerConfig
    from trainer.start_report import MODEL
    from trainer.worker import Worker

    config = WorkerConfig("sd15-random", "cuda", str(tmp_path / "work"), str(tmp_path / "classes"),
                          compile_cache_dir=str(tmp_path / "compiled"))
    worker = Worker(config)
    report = worker.prepare()
    assert report.names()[0] == MODEL and not worker._background.finished
    item = WorkItem(1, GenerateParams(GenerateRequest("on the moon", seed=5, steps=10)), GenerateInputs())
    before: list = []
    worker.execute(item, before.append, lambda: False)
    assert isinstance(before[-1], events.Done) and not worker.engine._compiled_ready(training=False)
    assert worker.wait_compiled(timeout=540)
    after: list = []
    worker.execute(item, after.append, lambda: False)
    assert worker.engine._compiled_ready(training=False)
    plain, compiled = (np.asarray(Image.open(io.BytesIO(out[-1].result.images[0].png)), dtype=np.int16)
                       for out in (before, after))
    assert np.abs(plain - compiled).mean() < 2  # bf16 kernels fused otherwise, the same picture
    assert list((tmp_path / "compiled" / "artifacts").glob("*.bin"))  # kept for the next start
    worker.stop_compiling()
