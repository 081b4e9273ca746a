"""Regional compilation for generation (trainer.compiled_blocks), on the tiny model.

Inductor pays only on a GPU (tests/test_gpu.py compares its pictures there); here the blocks are
compiled with torch.compile's cheap backends, which check the wiring: which blocks are compiled, that
the compiled code is what runs, that it draws the same pictures, and that it stays out of trainings.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig, inject_adapter_in_model

from tests.test_generate import PERSON, REQUEST, pixels
from trainer.compiled_blocks import CompiledBlocks
from trainer.engine import GenerateRequest, GenerationEngine
from trainer.models import build_random_pipeline


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def overridden(blocks: CompiledBlocks) -> list[bool]:
    return ["forward" in vars(block) for block in blocks.blocks]


def test_the_repeated_blocks_are_compiled_only_while_installed() -> None:
    pipe = build_random_pipeline("tiny")
    blocks = CompiledBlocks(pipe, backend=CountingBackend())
    unet = [m for m in pipe.unet.modules() if isinstance(m, ResnetBlock2D | BasicTransformerBlock)]
    decoder = [m for m in pipe.vae.decoder.modules() if isinstance(m, ResnetBlock2D)]
    assert unet and decoder and blocks.blocks == unet + decoder
    assert not any(isinstance(m, ResnetBlock2D) and m in blocks.blocks for m in pipe.vae.encoder.modules())

    with blocks.installed():
        assert all(overridden(blocks))
    assert not any(overridden(blocks))
    with pytest.raises(RuntimeError, match="boom"), blocks.installed():
        raise RuntimeError("boom")
    assert not any(overridden(blocks))


def test_compiled_blocks_compute_what_the_plain_blocks_compute() -> None:
    """Through AOT autograd (the functional graphs inductor compiles), for two latent sizes."""
    pipe = build_random_pipeline("tiny")
    blocks = CompiledBlocks(pipe, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in (8, 12):
            x = torch.randn(2, 4, size, size, generator=g)
            text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
            plain = pipe.unet(x, 500, encoder_hidden_states=text).sample
            decoded = pipe.vae.decode(x[:1]).sample
            with blocks.installed():
                torch.testing.assert_close(pipe.unet(x, 500, encoder_hidden_states=text).sample, plain)
                torch.testing.assert_close(pipe.vae.decode(x[:1]).sample, decoded)


def test_an_engine_with_compiled_blocks_draws_what_a_plain_engine_draws() -> None:
    backend = CountingBackend()
    compiled = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=backend)
    plain = GenerationEngine(build_random_pipeline("tiny"))
    assert plain._compiled is None  # off by default without CUDA graphs

    seen: list[list[bool]] = []
    first = compiled.generate(REQUEST, on_event=lambda _e: seen.append(overridden(compiled._compiled)),
                              **PERSON)[0]
    assert seen and all(all(step) for step in seen)  # the denoising ran the compiled blocks
    assert backend.graphs > 0
    assert (pixels(first) == pixels(plain.generate(REQUEST, **PERSON)[0])).all()
    traced = backend.graphs
    assert compiled.generate(REQUEST, **PERSON)[0].png == first.png
    assert backend.graphs == traced  # compiled once, then reused
    other = GenerateRequest(prompt=REQUEST.prompt, seed=3, steps=2, num_images=2, aspect="portrait")
    assert [im.png for im in compiled.generate(other, **PERSON)] == [im.png for im in plain.generate(other, **PERSON)]
    assert not any(overridden(compiled._compiled))


def test_between_training_steps_the_blocks_holding_adapters_run_plain_and_the_others_compiled() -> None:
    """The training's PEFT layers sit in the transformer blocks: compiling them would stall the training."""
    pipe = build_random_pipeline("tiny")
    backend = CountingBackend()
    engine = GenerationEngine(pipe, compile_blocks=True, compile_backend=backend)
    expected = GenerationEngine(build_random_pipeline("tiny")).generate(REQUEST, **PERSON)[0]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v"]), pipe.unet, adapter_name="learning")
    holds_adapter = [isinstance(block, BasicTransformerBlock) for block in engine._compiled.blocks]
    assert any(holds_adapter) and not all(holds_adapter)

    seen: list[list[bool]] = []
    image = engine.generate(REQUEST, on_event=lambda _e: seen.append(overridden(engine._compiled)), **PERSON)[0]
    assert seen and all(step == [not held for held in holds_adapter] for step in seen)
    assert backend.graphs > 0
    assert image.png == expected.png  # the training's adapter was switched off
    assert not any(overridden(engine._compiled))


def test_blocks_that_fail_to_compile_run_as_they_are() -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        raise RuntimeError("no C compiler")

    engine = GenerationEngine(build_random_pipeline("tiny"), compile_blocks=True, compile_backend=broken)
    expected = GenerationEngine(build_random_pipeline("tiny")).generate(REQUEST, **PERSON)[0]
    assert engine.generate(REQUEST, **PERSON)[0].png == expected.png
