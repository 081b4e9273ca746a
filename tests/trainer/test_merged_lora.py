"""Merged LoRAs (trainer.merged_lora) compute what PEFT's adapter layers compute, and leave no trace.

Also the CPU-side rules of trainer.graphs: which calls can be graphed, and the method replacement
being confined to its block, which variant's graph a call replays (graph capture and replay
themselves need CUDA: tests/trainer/test_gpu.py).
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from tests.photos_factory import training_photos
from tests.trainer.test_dreambooth import small
from trainer import merged_lora
from trainer.dreambooth import train
from trainer.graphs import GraphedCall, Override, _signature
from trainer.pipelines import build_random_pipeline


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on the UNet and the text encoder, trained hard enough to change outputs visibly."""
    root = tmp_path_factory.mktemp("merged")
    return train(training_photos(), "zqx", "woman", small(steps=3, learning_rate=5e-2, train_text_encoder=True,
                                                       prior_preservation=False, rank=4, alpha=8),
                 pipeline=build_random_pipeline("tiny"), base_model="tiny", out_dir=root / "out", work_dir=root / "work", class_cache_dir=root / "cache",
                 device="cpu").lora_path


def _inputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=g)
    ids = pipe.tokenizer(["a photo of zqx woman", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    return latents, torch.tensor([500, 20]), ids


def _outputs(pipe, latents: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(latents, timesteps, text).sample


def test_a_merged_lora_computes_what_peft_layers_compute(lora_file: Path) -> None:
    pipe = build_random_pipeline("tiny")
    inputs = _inputs(pipe)
    base = _outputs(pipe, *inputs)
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    lora = merged_lora.read_lora(lora_file, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert {g.scale for g in lora.groups} == {2.0}  # alpha 8 over rank 4, as PEFT scales it
    # One group per weight shape, each layer in exactly one group.
    assert len({tuple(layer.weight.shape) for g in lora.groups for layer in g.layers}) == len(lora.groups)
    assert lora.layers == len({id(layer) for g in lora.groups for layer in g.layers}) > len(lora.groups)
    with merged_lora.merged(lora):
        merged = _outputs(pipe, *inputs)
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the originals, bit for bit

    pipe.load_lora_weights(str(lora_file), adapter_name="peft")
    with_peft = _outputs(pipe, *inputs)
    for ours, theirs, plain in zip(merged, with_peft, base, strict=True):
        assert (theirs - plain).abs().max() > 1e-2  # the LoRA matters...
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # ...and merging changes nothing


def test_merging_again_and_again_drifts_nothing_and_an_error_still_restores(lora_file: Path) -> None:
    pipe = build_random_pipeline("tiny", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora = merged_lora.read_lora(lora_file, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert all(g.down.dtype == g.up.dtype == torch.bfloat16 for g in lora.groups)
    for _ in range(50):
        with merged_lora.merged(lora):
            pass
    with pytest.raises(RuntimeError, match="mid-generation"), merged_lora.merged(lora):
        raise RuntimeError("mid-generation")
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())


def test_components_with_their_own_alpha_are_merged_each_with_its_own_scale(lora_file: Path,
                                                                            tmp_path: Path) -> None:
    """Layers of one shape are merged in one batch, but never across two scales (here the text
    encoder's and the UNet's 32x32 projections share a shape and differ in alpha)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        metadata = dict(f.metadata())
    adapter = json.loads(metadata["lora_adapter_metadata"])
    adapter["text_encoder.lora_alpha"] = 4  # scale 1 for the text encoder, 2 for the UNet
    metadata["lora_adapter_metadata"] = json.dumps(adapter)
    tensors = load_file(lora_file)
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed), metadata=metadata)

    pipe = build_random_pipeline("tiny")
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    originals = {name: module.state_dict() for name, module in components.items()}
    originals = {(name, k): v.clone() for name, sd in originals.items() for k, v in sd.items()}
    lora = merged_lora.read_lora(mixed, components)
    assert {g.scale for g in lora.groups} == {1.0, 2.0}
    with merged_lora.merged(lora):
        for key, down in tensors.items():
            if not key.endswith("down.weight"):
                continue
            up = tensors[key.replace("down.weight", "up.weight")]
            component, _, path = key.partition(".")
            path = path.removeprefix("text_model.").rsplit(".lora", 1)[0]
            scale = 1.0 if component == "text_encoder" else 2.0
            weight = components[component].get_submodule(path).weight
            before = originals[(component, path.replace(".lora_linear_layer", "") + ".weight")]
            torch.testing.assert_close(weight, before + scale * up @ down, rtol=1e-5, atol=1e-6)


def test_a_lora_reaches_layers_wrapped_by_a_training_adapter(lora_file: Path) -> None:
    """Between training steps the UNet's projections are PEFT layers; the merge goes to their base layer."""
    pipe = build_random_pipeline("tiny")
    inputs = _inputs(pipe)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with merged_lora.merged(merged_lora.read_lora(lora_file, components)):
        expected = _outputs(pipe, *inputs)
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "trained")
    pipe.unet.disable_adapters()
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    with merged_lora.merged(merged_lora.read_lora(lora_file, components)):
        wrapped = _outputs(pipe, *inputs)
    for a, b in zip(expected, wrapped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["unknown component", "wrong shape", "missing half", "dora"])
def test_files_that_do_not_fit_are_refused(lora_file: Path, tmp_path: Path, damage: str) -> None:
    pipe = build_random_pipeline("tiny")
    tensors = load_file(lora_file)
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        metadata = dict(f.metadata())
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("lora.down.weight"))
    if damage == "unknown component":
        tensors["controlnet." + key.removeprefix("unet.")] = tensors[key].clone()
    elif damage == "wrong shape":
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    elif damage == "missing half":
        del tensors[key]
    else:
        metadata["lora_adapter_metadata"] = '{"unet.use_dora": true}'
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(merged_lora.UnusableLora):
        merged_lora.read_lora(bad, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})


# ---- trainer.graphs, the parts that do not need CUDA --------------------------------------------------
def test_only_cuda_tensors_and_plain_options_make_a_graph_key() -> None:
    def key(*args, **kwargs):
        return _signature(*pytree.tree_flatten((args, kwargs)))

    assert key(torch.zeros(2)) is None  # CPU tensors run eagerly
    assert key(object()) is None
    meta = torch.empty(2, 4, device="meta")
    assert key(meta, return_dict=False) is None
    # Same structure, same options: the same key; None, bools and numbers are part of it.
    assert key(1, None, flag=True) == key(1, None, flag=True) != key(1, None, flag=False)
    assert key(1, flag=True) != key(1.0, flag=True)


def test_an_eager_call_on_cpu_and_the_replacement_stays_in_its_block() -> None:
    module = torch.nn.Linear(3, 2)
    graphed = GraphedCall(module.forward, module, name="linear")
    x = torch.randn(4, 3)
    torch.testing.assert_close(graphed(x), module(x))
    assert len(graphed) == 0  # nothing captured off CUDA

    calls = []
    with Override(module, "forward", lambda t: calls.append(t) or t):
        assert module(x) is x
    assert len(calls) == 1 and "forward" not in vars(module)
    torch.testing.assert_close(module(x), graphed(x))


def test_graphs_are_dropped_when_weights_move_but_not_when_a_training_adapter_arrives() -> None:
    """A captured graph points at weight storage: a cast must drop it, an injected LoRA must not."""
    from peft import LoraConfig

    pipe = build_random_pipeline("tiny")
    graphed = GraphedCall(pipe.unet.forward, pipe.unet, name="UNet")
    graphed._graphs["captured"] = object()  # stands for a graph captured on CUDA
    graphed._weights = graphed._weight_addresses()

    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]), "trained")  # wraps, same storage
    graphed.check_weights()
    assert len(graphed) == 1
    pipe.unet.to(torch.bfloat16)  # the trainer casting the model moves every weight
    graphed.check_weights()
    assert len(graphed) == 0


def test_a_variant_replays_the_graphs_it_may_reuse_and_otherwise_captures_its_own(monkeypatch) -> None:
    """During a training the engine replays the base model's graphs (variant None) where they exist and
    captures its own "next to a training" graphs only for shapes without one; outside a training those
    are never replayed. Capture and replay stand in for CUDA here; the lookup is what is tested."""
    from trainer import graphs

    monkeypatch.setattr(graphs, "_signature", lambda leaves, spec: "one picture")
    call = GraphedCall(lambda: None, torch.nn.Linear(1, 1), name="UNet")
    replayed: list[Hashable] = []

    class Recorded:
        def __init__(self, key: Hashable) -> None:
            self.key = key

        def replay(self) -> None:
            replayed.append(self.key)

    def capture(key, leaves, spec):
        call._graphs[key] = graphs._Graph(Recorded(key), [], None)
        return call._graphs[key]

    monkeypatch.setattr(call, "_capture", capture)
    idle, training = (None, "one picture"), ("next to a training", "one picture")

    def draw(variant: Hashable, reuse: tuple[Hashable, ...] = ()) -> Hashable:
        call.variant, call.reuse = variant, reuse
        call()
        return replayed[-1]

    assert draw("next to a training", (None,)) == training  # nothing to reuse yet: its own capture
    assert draw(None) == idle  # outside the training the slower kernels are not replayed
    assert draw("next to a training", (None,)) == idle  # the base model's graph is preferred now
    assert draw("next to a training") == training  # and without reuse each variant keeps its own
    assert set(call._graphs) == {training, idle}
