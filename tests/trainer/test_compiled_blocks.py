"""Regional compilation for generation (trainer.compiled_blocks), on the tiny model.

Inductor pays only on a GPU (tests/trainer/test_gpu.py compares its pictures there); here the stages and
blocks are compiled with torch.compile's cheap backends, which check the wiring: which regions are
compiled, that the compiled code is what runs, that it draws the same pictures, that it stays out of
trainings, and that the warm-up compiles what a picture between training steps needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig, inject_adapter_in_model

from jobs.requests import GenerateRequest
from tests.trainer.test_dreambooth import run_train, small
from tests.trainer.test_generate import PERSON, REQUEST, pixels
from trainer.adapters import holds_adapters
from trainer.compiled_blocks import ByShape, CompiledBlocks
from trainer.engine import ANY_SHAPE, DURING_TRAINING, GenerationEngine, square_part
from trainer.pipelines import build_random_pipeline


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given
    (`inputs`: each graph's input names, which say what it was traced from)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.inputs: list[list[str]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        self.inputs.append([node.name for node in gm.graph.nodes if node.op == "placeholder"])
        return gm.forward


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_dynamo")]


def overridden(modules: list[torch.nn.Module]) -> list[bool]:
    return ["forward" in vars(module) for module in modules]


def installed_now(blocks: CompiledBlocks) -> tuple[list[bool], list[bool]]:
    """(which stages, which blocks) have their compiled forward in place."""
    return overridden(blocks.stages), overridden(blocks.blocks)


def test_the_stages_or_their_blocks_are_compiled_only_while_installed() -> None:
    pipe = build_random_pipeline("tiny")
    blocks = CompiledBlocks(pipe, backend=CountingBackend())
    unet = pipe.unet
    assert blocks.stages == [*unet.down_blocks, unet.mid_block, *unet.up_blocks, pipe.vae.decoder]
    in_unet = [m for m in unet.modules() if isinstance(m, ResnetBlock2D | BasicTransformerBlock)]
    in_decoder = [m for m in pipe.vae.decoder.modules() if isinstance(m, ResnetBlock2D)]
    assert in_unet and in_decoder and len(blocks.blocks) == len(in_unet) + len(in_decoder)
    assert {id(m) for m in blocks.blocks} == {id(m) for m in in_unet + in_decoder}
    assert not any(isinstance(m, ResnetBlock2D) and m in blocks.blocks for m in pipe.vae.encoder.modules())

    with blocks.installed():  # whole stages by default, their blocks plain inside
        assert installed_now(blocks) == ([True] * len(blocks.stages), [False] * len(blocks.blocks))
    with blocks.installed(whole_stages=False):
        assert installed_now(blocks) == ([False] * len(blocks.stages), [True] * len(blocks.blocks))
    assert not any(sum(installed_now(blocks), []))
    with pytest.raises(RuntimeError, match="boom"), blocks.installed():
        raise RuntimeError("boom")
    assert not any(sum(installed_now(blocks), []))
    assert not CompiledBlocks(pipe, backend="eager", whole_stages=False).whole_stages


@pytest.mark.parametrize("whole_stages", [True, False], ids=["stages", "blocks"])
def test_compiled_regions_compute_what_the_plain_ones_compute(whole_stages: bool) -> None:
    """Through AOT autograd with inductor's decompositions (the graphs inductor compiles), for three
    latent sizes."""
    pipe = build_random_pipeline("tiny")
    blocks = CompiledBlocks(pipe, backend="aot_eager_decomp_partition", whole_stages=whole_stages)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in ((8, 8), (12, 12), (8, 12)):
            x = torch.randn(2, 4, *size, generator=g)
            text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
            plain = pipe.unet(x, 500, encoder_hidden_states=text).sample
            decoded = pipe.vae.decode(x[:1]).sample
            with blocks.installed():
                torch.testing.assert_close(pipe.unet(x, 500, encoder_hidden_states=text).sample, plain)
                torch.testing.assert_close(pipe.vae.decode(x[:1]).sample, decoded)


def test_an_engine_with_compiled_stages_draws_what_a_plain_engine_draws() -> None:
    backend = CountingBackend()
    compiled = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=backend)
    plain = GenerationEngine(build_random_pipeline("tiny"))
    assert plain._compiled is None  # off by default without CUDA graphs
    regions = compiled._compiled

    seen: list[tuple[list[bool], list[bool]]] = []
    first = compiled.generate(REQUEST, on_event=lambda _e: seen.append(installed_now(regions)), **PERSON)[0]
    assert seen and all(step == ([True] * len(regions.stages), [False] * len(regions.blocks)) for step in seen)
    assert backend.graphs == len(regions.stages)  # one graph per stage: nothing split them
    assert (pixels(first) == pixels(plain.generate(REQUEST, **PERSON)[0])).all()
    assert compiled.generate(REQUEST, **PERSON)[0].png == first.png
    assert backend.graphs == len(regions.stages)  # compiled once, then reused
    other = GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, num_images=2, aspect="portrait")
    assert [im.png for im in compiled.generate(other, **PERSON)] == [im.png for im in plain.generate(other, **PERSON)]
    assert not any(sum(installed_now(regions), []))


def test_between_training_steps_regions_holding_adapters_run_plain_and_the_others_compiled() -> None:
    """The training's PEFT layers sit in the transformer blocks: compiling them would stall the training.
    Their stages are split into blocks; stages without transformer blocks stay whole."""
    pipe = build_random_pipeline("tiny")
    backend = CountingBackend()
    engine = GenerationEngine(pipe, compile_blocks=True, compile_backend=backend)
    regions = engine._compiled
    expected = GenerationEngine(build_random_pipeline("tiny")).generate(REQUEST, **PERSON)[0]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v"]), pipe.unet, adapter_name="learning")
    split = [holds_adapters(stage) for stage in regions.stages]
    assert any(split) and not all(split)
    split_blocks = [block for stage, held in zip(regions.stages, split, strict=True) if held
                    for block in stage.modules() if block in regions.blocks]
    compiled_blocks = [block in split_blocks and not isinstance(block, BasicTransformerBlock)
                       for block in regions.blocks]
    assert any(compiled_blocks)

    seen: list[tuple[list[bool], list[bool]]] = []
    image = engine.generate(REQUEST, on_event=lambda _e: seen.append(installed_now(regions)), **PERSON)[0]
    assert seen and all(step == ([not held for held in split], compiled_blocks) for step in seen)
    assert backend.graphs > 0
    assert image.png == expected.png  # the training's adapter was switched off
    assert not any(sum(installed_now(regions), []))


def test_the_warm_up_compiles_what_a_picture_between_training_steps_runs(caplog: pytest.LogCaptureFixture) -> None:
    pipe = build_random_pipeline("tiny")
    backend = CountingBackend()
    engine = GenerationEngine(pipe, compile_blocks=True, compile_backend=backend)
    heard: list[str] = []
    timed: list[tuple[str, float]] = []
    with caplog.at_level(logging.INFO, logger="trainer.engine"):
        total = engine.warm_up(counts=(1,), on_part=heard.append, on_done=lambda *part: timed.append(part))
    # Each part's time is told as it ends, unrounded (the worker's start report), within the whole ...
    assert [name for name, _ in timed] == [ANY_SHAPE, DURING_TRAINING, square_part(1)]
    assert all(seconds >= 0 for _, seconds in timed) and sum(seconds for _, seconds in timed) <= total
    # ... and is in the log, for the operator waiting on a start-up ...
    parts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up: ")]
    assert [p.split(" in ")[0] for p in parts] == [
        "warm-up: stages and decoder compiled for dynamic shapes",
        "warm-up: blocks compiled for pictures during trainings",
        "warm-up: 1 square picture(s) compiled and captured"]
    # ... and each part is announced as it begins, for the people whose jobs wait on it.
    assert heard == ["compiling the model for pictures of any shape",
                     "compiling the model for pictures drawn during trainings", "getting one square picture ready"]
    assert backend.graphs > len(engine._compiled.stages)  # the stages, then the blocks on their own
    warmed = backend.graphs
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v"]), pipe.unet, adapter_name="learning")
    engine.generate(GenerateRequest(prompt=REQUEST.prompt, seed=1, steps=2), **PERSON)
    assert backend.graphs == warmed  # nothing left to compile in the middle of a training
    assert not any(sum(installed_now(engine._compiled), []))
    assert GenerationEngine(build_random_pipeline("tiny")).warm_up() == 0.0  # nothing to prepare on a CPU


class GraphKeys:
    """A torch.compile backend that runs the traced graph as is and records what inductor's cache
    would key it on: its code and its inputs' (symbolic) shapes and dtypes."""

    def __init__(self) -> None:
        self.keys: set[tuple[str, tuple[str, ...]]] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        self.keys.add((gm.code, tuple(f"{getattr(v, 'shape', v)} {getattr(v, 'dtype', '')}" for v in values)))
        return gm.forward


def test_the_warm_up_parts_run_apart_compile_what_the_whole_warm_up_compiles() -> None:
    """A worker's start helpers (trainer.start_helpers) each run some parts in a process of their
    own, and the worker reads their code back from inductor's cache: that holds only if a part run
    alone traces the graphs it traces in the whole warm-up."""
    whole = GraphKeys()
    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=whole)
    assert engine.warm_up_parts(counts=(1, 2)) == ["any-shape", "during-training", "square-1", "square-2"]
    engine.warm_up(counts=(1, 2))
    apart: set[tuple[str, tuple[str, ...]]] = set()
    for parts in (["any-shape"], ["during-training"], ["square-1", "square-2"]):  # the worker's, each helper's
        torch._dynamo.reset()  # as in a process of its own
        backend = GraphKeys()
        began: list[str] = []
        helper = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=backend)
        helper.warm_up(counts=(1, 2), parts=parts, before_part=began.append)
        assert began == parts
        apart |= backend.keys
    assert len(whole.keys) > len(engine._compiled.stages)
    assert whole.keys <= apart
    assert GenerationEngine(build_random_pipeline("tiny")).warm_up_parts() == []  # nothing compiles on a CPU


def test_nothing_compiles_during_a_real_training_served_between_its_steps(tmp_path: Path) -> None:
    """A training leaves the modules frozen and in eval mode, and puts the UNet in training mode
    between steps: the warm-up must compile what every one of those states runs."""
    pipe = build_random_pipeline("tiny")
    pipe.unet.train()  # as a freshly built model is; the engine sets what pictures need
    backend = CountingBackend()
    engine = GenerationEngine(pipe, compile_blocks=True, compile_backend=backend)
    engine.warm_up(counts=(1,))
    warmed = backend.graphs
    traced: list[int] = []

    def serve() -> None:
        engine.generate(GenerateRequest(prompt=REQUEST.prompt, seed=1, steps=2))
        traced.append(backend.graphs)

    run_train(tmp_path, small(steps=3, prior_preservation=False), pipe=pipe, serve_riders=serve)
    # Served while caching (no adapter yet), between steps and after the last: nothing compiled.
    assert len(traced) > 3 and set(traced) == {warmed}
    engine.generate(REQUEST, **PERSON)
    assert backend.graphs == warmed  # and none after it either
    assert pipe.unet.training is False


def test_the_warm_up_pictures_run_code_compiled_for_their_shapes_and_other_pictures_dynamic_code() -> None:
    """Static-shape code would compile again for every new shape, so it only ever meets the shapes
    the warm-up taught it; a shape it has not met runs the dynamic-shape code, compiled then too."""
    backend = CountingBackend()
    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=backend)
    plain = GenerationEngine(build_random_pipeline("tiny"))
    regions = engine._compiled
    engine.warm_up(counts=(1, 2))  # as the default (1, 4): one picture, and a batch
    ran: list[str] = []
    *unet_stages, decoder = regions.regions
    assert not isinstance(decoder.forward, ByShape)  # the decoder keeps dynamic shapes
    for region in unet_stages:
        by_shape = region.forward
        assert isinstance(by_shape, ByShape) and by_shape.shapes
        for kind in ("static", "dynamic"):
            code = getattr(by_shape, kind)
            setattr(by_shape, kind, lambda *a, _code=code, _kind=kind, **k: ran.append(_kind) or _code(*a, **k))

    square = engine.generate(REQUEST, **PERSON)[0]
    unet_calls = REQUEST.steps * len(unet_stages)  # each stage, each step
    assert ran == ["static"] * unet_calls
    # The static code runs the linears sharing an input fused (trainer.fused_linears): the same sums
    # in another order, so a pixel may round the other way.
    assert np.abs(pixels(square).astype(int) - pixels(plain.generate(REQUEST, **PERSON)[0])).max() <= 1
    # Other shapes run the dynamic-shape code. The warm-up compiled it, on a portrait, and the
    # sizes it saw then stay symbolic: neither the other aspects nor a square of another count
    # compile again.
    warmed = backend.graphs
    for other in (GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, aspect="portrait"),
                  GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, aspect="landscape"),
                  GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, num_images=3),
                  GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, guidance=1.0)):
        ran.clear()
        images = engine.generate(other, **PERSON)
        assert ran == ["dynamic"] * unet_calls
        if engine.guidance_for(other) > 1:
            assert backend.graphs == warmed, other
        assert [pixels(im).tolist() for im in images] == [pixels(im).tolist() for im in plain.generate(other, **PERSON)]
    # The static code still holds the warm-up's shapes and compiles nothing for the square picture.
    ran.clear()
    compiled = backend.graphs
    assert engine.generate(REQUEST, **PERSON)[0].png == square.png
    assert ran == ["static"] * unet_calls and backend.graphs == compiled


def test_without_static_shapes_the_warm_up_compiles_less_and_every_picture_runs_the_dynamic_code() -> None:
    """COMPILE_STATIC_SHAPES=0: a shorter first start; the pictures are the plain engine's."""
    with_static, without = CountingBackend(), CountingBackend()
    GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True,
                     compile_backend=with_static).warm_up(counts=(1, 2))
    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=without,
                              static_shapes=False)
    squares_compiled: list[int] = []  # graphs compiled so far, as each square picture of the warm-up starts
    original = engine.generate

    def generate(request: GenerateRequest, **kwargs):
        squares_compiled.append(without.graphs)
        return original(request, **kwargs)

    engine.generate = generate
    engine.warm_up(counts=(1, 2))
    del engine.generate
    assert 0 < without.graphs < with_static.graphs
    assert not any(isinstance(region.forward, ByShape) for region in engine._compiled.regions)
    # The UNet's code compiled on the portrait, first, serves the warm-up's squares: they compile
    # nothing more for it. The decoder's may compile again here: on a CPU, PyTorch picks a
    # convolution's backend by the input's size, and dynamo guards the code on that choice.
    assert squares_compiled
    by_squares = without.inputs[squares_compiled[0]:]
    assert all("l_sample_" in names for names in by_squares), by_squares
    warmed = without.graphs
    plain = GenerationEngine(build_random_pipeline("tiny"))
    for request in (REQUEST, GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, num_images=2),
                    GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, aspect="portrait")):
        images = engine.generate(request, **PERSON)
        assert [pixels(im).tolist() for im in images] == [pixels(im).tolist() for im in plain.generate(request, **PERSON)]
    assert without.graphs == warmed  # the warm-up compiled all of it


def test_regions_that_fail_to_compile_run_as_they_are() -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        raise RuntimeError("no C compiler")

    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=broken)
    expected = GenerationEngine(build_random_pipeline("tiny")).generate(REQUEST, **PERSON)[0]
    assert engine.generate(REQUEST, **PERSON)[0].png == expected.png
