"""QUANTIZE=int8 on the tiny-flux model: the transformer's Linear weights kept in int8 at load, LoRA
training on them, files that load into an unquantised model, and generation with people's LoRAs
added beside the int8 weights (never merged into them) and taken off exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs.requests import GenerateRequest
from tests.photos_factory import training_photos
from tests.trainer.test_flux import CLASS, HANDLE, run_train, small
from trainer import adapters, merged_lora
from trainer.dreambooth import train
from trainer.engine import GenerationEngine
from trainer.errors import ModelUnavailable
from trainer.pipelines import build_random_pipeline, load_pipeline, save_random_model
from trainer.quantization import is_quantized

pytestmark = pytest.mark.usefixtures("one_thread")


def linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def int8_bytes(weight: torch.Tensor) -> int:
    """The bytes of a torchao int8 weight's codes (one per weight; the per-row scales come on top)."""
    codes = weight.qdata
    assert codes.dtype == torch.int8
    return codes.numel() * codes.element_size()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One training on the int8 transformer, with gradient checkpointing, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("int8-training")
    pipe = load_pipeline("tiny-flux", quantize="int8")
    config = small(steps=10, learning_rate=3e-2, alpha=8, gradient_checkpointing=True)
    return pipe, run_train(tmp, config, pipe=pipe)


def test_a_quantised_load_keeps_the_transformers_linear_weights_in_int8(tmp_path: Path) -> None:
    """As a worker loads a Flux folder with QUANTIZE=int8: every Linear weight of the transformer is
    torchao's int8 tensor (a quarter of fp32's bytes), and the text encoders and the VAE are as loaded."""
    folder = save_random_model("tiny-flux", tmp_path / "model")
    plain, quantised = load_pipeline(str(folder)), load_pipeline(str(folder), quantize="int8")
    layers = linears(quantised.transformer)
    assert layers and all(is_quantized(layer.weight) for layer in layers)
    full = sum(layer.weight.numel() * 4 for layer in linears(plain.transformer))
    assert sum(int8_bytes(layer.weight) for layer in layers) == full // 4
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert not any(is_quantized(p) for p in getattr(quantised, name).parameters()), name
    # The int8 weights are the fp32 ones rounded: within half a step of each row's scale.
    for ours, theirs in zip(layers, linears(plain.transformer), strict=True):
        step = theirs.weight.abs().amax(dim=1, keepdim=True) / 127
        assert ((ours.weight.dequantize() - theirs.weight).abs() <= step * 0.51 + 1e-7).all()
    assert not any(is_quantized(layer.weight) for layer in linears(plain.transformer))


def test_int8_is_refused_for_stable_diffusion_and_unknown_modes() -> None:
    with pytest.raises(ModelUnavailable, match="QUANTIZE=int8 works with Flux base models only"):
        load_pipeline("tiny", quantize="int8")
    with pytest.raises(ValueError, match="unknown quantisation 'int4'"):
        load_pipeline("tiny-flux", quantize="int4")


def test_a_training_on_int8_weights_learns_and_its_files_load_into_an_unquantised_model(trained) -> None:
    pipe, result = trained
    assert result.steps == 10 and all(np.isfinite(result.losses))
    tensors = load_file(result.lora_path)
    ups = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert ups and all(up.abs().sum() > 0 for up in ups)  # initialised at zero: gradients reached every layer
    assert result.kohya_path is not None and load_file(result.kohya_path)
    # The pipeline comes back as found: no adapter layers left, its weights still int8.
    assert all(type(layer) is torch.nn.Linear and is_quantized(layer.weight) for layer in linears(pipe.transformer))
    plain = build_random_pipeline("tiny-flux")
    before = {k: v.clone() for k, v in plain.transformer.state_dict().items()}
    plain.load_lora_weights(str(result.lora_path))  # diffusers' own Flux loader
    plain.fuse_lora(lora_scale=1.0)
    fused = {k.replace("base_layer.", ""): v for k, v in plain.transformer.state_dict().items() if "lora_" not in k}
    assert sum(not torch.equal(before[k], fused[k]) for k in before) == 15  # the 15 targeted layers


def test_the_int8_step_is_the_plain_step_on_rounded_weights(tmp_path: Path) -> None:
    """Same seeds, same draws: the losses follow the unquantised training's closely (the weights differ
    by their int8 rounding only), so the step itself is the one Flux always trains with."""
    config = small(steps=4, learning_rate=1e-2)
    quantised = run_train(tmp_path, config, tag="int8", pipe=load_pipeline("tiny-flux", quantize="int8"))
    plain = run_train(tmp_path, config, tag="plain", pipe=load_pipeline("tiny-flux"))
    np.testing.assert_allclose(quantised.losses, plain.losses, rtol=0.02)
    assert quantised.losses != plain.losses  # the weights really were rounded


def test_a_training_on_int8_weights_always_checkpoints_and_keeps_no_16_bit_weight_copies(tmp_path: Path) -> None:
    """Each int8 layer computes with a 16-bit copy of its weight (transposed, `in x out`); autograd would
    keep every block's copies for the backward pass, more than the unquantised weights take, unless
    the blocks are checkpointed: then only their inputs are kept, and the copies are made again."""
    from jobs import events
    from trainer.dreambooth import TrainingRun

    pipe = load_pipeline("tiny-flux", quantize="int8")
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    copies = {(layer.in_features, layer.out_features) for block in blocks for layer in linears(block)}
    run = TrainingRun(training_photos(), HANDLE, CLASS, small(steps=2), base_model="tiny-flux",
                      out_dir=tmp_path / "out", work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cache",
                      on_event=events.ignore, should_cancel=lambda: False, resume_from=None)
    saved: list[tuple[int, ...]] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with run.session(pipe):
        assert run.config.gradient_checkpointing and pipe.transformer.is_gradient_checkpointing
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            assert np.isfinite(run.train_step().item())
    assert saved and not [shape for shape in saved if shape in copies]
    assert not pipe.transformer.is_gradient_checkpointing  # the pipeline comes back as it was


def test_int8_pictures_take_a_persons_lora_unmerged_and_give_it_back_exactly(trained) -> None:
    pipe, result = trained
    layers = linears(pipe.transformer)
    codes = [layer.weight.qdata.clone() for layer in layers]
    engine = GenerationEngine(pipe)
    request = GenerateRequest(prompt="on the moon", seed=3, steps=2, face_pass=False)
    base = engine.generate(request)
    person = engine.generate(request, adapter_key="sks", lora_path=result.lora_path, handle=HANDLE, class_word=CLASS)
    other = merged_lora.read_lora(result.lora_path, {"transformer": pipe.transformer})
    assert other.groups and all(group.quantized for group in other.groups)
    after = engine.generate(request)
    again = engine.generate(request, adapter_key="sks", handle=HANDLE, class_word=CLASS)
    assert np.abs(pixels(base[0].png) - pixels(person[0].png)).mean() > 1  # the LoRA changes the picture
    assert after[0].png == base[0].png and again[0].png == person[0].png  # taken off exactly; resident
    assert all(torch.equal(layer.weight.qdata, code) for layer, code in zip(layers, codes, strict=True))
    assert not any(layer._forward_hooks for layer in layers)


def test_two_people_swap_on_int8_weights_and_each_picture_stays_theirs(tmp_path: Path, trained) -> None:
    pipe, first = trained
    second = run_train(tmp_path, small(steps=10, learning_rate=3e-2, alpha=8, seed=7), tag="second", pipe=pipe)
    engine = GenerationEngine(pipe)
    request = GenerateRequest(prompt="on the moon", seed=5, steps=2, face_pass=False)
    a = engine.generate(request, adapter_key="a", lora_path=first.lora_path, handle=HANDLE, class_word=CLASS)
    b = engine.generate(request, adapter_key="b", lora_path=second.lora_path, handle=HANDLE, class_word=CLASS)
    assert a[0].png != b[0].png
    assert engine.generate(request, adapter_key="a", handle=HANDLE, class_word=CLASS)[0].png == a[0].png
    assert engine.generate(request, adapter_key="b", handle=HANDLE, class_word=CLASS)[0].png == b[0].png


def test_a_picture_drawn_between_int8_training_steps_is_the_same_picture(tmp_path: Path, trained) -> None:
    """A worker serves pictures between a training's steps: the person's LoRA is added beside layers that
    hold the training's adapter too (switched off for the picture), and the training goes on after."""
    pipe, first = trained
    engine = GenerationEngine(pipe)
    request = GenerateRequest(prompt="on the moon", seed=9, steps=2, face_pass=False)
    before = engine.generate(request, adapter_key="a", lora_path=first.lora_path, handle=HANDLE, class_word=CLASS)
    during: list[bytes] = []

    def serve() -> None:
        if not during and adapters.holds_adapters(pipe.transformer):  # between steps, not before them
            during.append(engine.generate(request, adapter_key="a", handle=HANDLE, class_word=CLASS)[0].png)

    result = train(training_photos(), HANDLE, CLASS, small(steps=3), pipeline=pipe, base_model="tiny-flux",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cache",
                   device="cpu", serve_riders=serve)
    assert result.steps == 3 and during == [before[0].png]


def test_an_int8_picture_is_close_to_the_unquantised_one(trained) -> None:
    """int8 rounds each weight by at most half of its row's step (0.4% of the row's largest weight);
    on tiny-flux that moves pixels by a fraction of a level on average and a few at most (measured:
    mean 0.13, max 1 of 255), where a person's LoRA moves them by several on average. A broken
    quantisation or a LoRA applied at the wrong scale would move them by far more."""
    quantised_pipe, result = trained
    request = GenerateRequest(prompt="on the moon", seed=3, steps=2, face_pass=False)
    quantised, plain = GenerationEngine(quantised_pipe), GenerationEngine(build_random_pipeline("tiny-flux"))
    for key in (None, "sks"):  # the base model, then with the person's LoRA (merged in the plain model)
        path = result.lora_path if key else None
        ours = pixels(quantised.generate(request, adapter_key=key, lora_path=path, handle=HANDLE,
                                         class_word=CLASS)[0].png)
        theirs = pixels(plain.generate(request, adapter_key=key, lora_path=path, handle=HANDLE,
                                       class_word=CLASS)[0].png)
        difference = np.abs(ours - theirs)
        assert difference.mean() < 0.5 and difference.max() <= 8, key


def test_the_command_line_and_a_worker_load_flux_in_int8(tmp_path: Path) -> None:
    """`--quantize int8` on `train` and `imagine`, and a worker's QUANTIZE from its environment."""
    from jobs.worker_config import WorkerConfig
    from tests.photos_factory import colour_fields
    from trainer.cli import build_parser, run
    from trainer.errors import TrainerError
    from trainer.worker import Worker

    model = save_random_model("tiny-flux", tmp_path / "tiny-flux")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(colour_fields(5, 512, cells=6, seed=1)):
        photo.save(photos / f"photo{i}.png")
    out = tmp_path / "lora"
    lines = run(["train", "--photos", str(photos), "--handle", "sks", "--class", "woman", "--out", str(out),
                 "--model", str(model), "--steps", "2", "--resolution", "64", "--rank", "4", "--device", "cpu",
                 "--class-cache", str(tmp_path / "cache"), "--quantize", "int8", "--gradient-checkpointing"])
    assert lines[2] == "steps: 2" and np.isfinite(float(lines[3].removeprefix("final loss: ")))
    drawn = run(["imagine", "a portrait of sks", "--lora", str(out), "--model", str(model), "--out",
                 str(tmp_path / "pictures"), "--n", "1", "--steps", "2", "--seed", "7", "--device", "cpu",
                 "--quantize", "int8"])
    assert len(drawn) == 1 and Image.open(drawn[0].removeprefix("image: ")).size == (64, 64)
    with pytest.raises(TrainerError, match="works with Flux base models only"):
        run(["imagine", "x", "--model", "tiny", "--out", str(tmp_path / "sd"), "--n", "1", "--steps", "1",
             "--device", "cpu", "--quantize", "int8"])

    assert build_parser({}).parse_args(["worker"]).quantize == "none"
    assert build_parser({"QUANTIZE": "int8"}).parse_args(["worker"]).quantize == "int8"
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["train", "--photos", ".", "--handle", "a", "--class", "b", "--out", ".",
                                     "--quantize", "int4"])
    with pytest.raises(TrainerError, match="QUANTIZE='int4' is unknown; use one of none, int8."):
        args = build_parser({"QUANTIZE": "int4", "JOB_SECRET": "j" * 32}).parse_args(["worker"])
        args.func(args)
    worker = Worker(WorkerConfig("tiny-flux", "cpu", str(tmp_path / "w"), str(tmp_path / "c"), quantize="int8"))
    assert all(is_quantized(layer.weight) for layer in linears(worker.pipeline.transformer))
