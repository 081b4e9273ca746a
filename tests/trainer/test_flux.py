"""Flux on the tiny-flux model: building and loading it, LoRA training by flow matching, its files,
resuming, the cached step against the plain recipe, and generation with a person's LoRA merged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.train_speed import recipe_for
from jobs import events, png_parameters
from jobs.requests import GenerateRequest, TrainConfig
from jobs.train_defaults import FAMILY_DEFAULTS, left_to_family
from tests.photos_factory import training_photos
from trainer import flux_kohya, merged_lora
from trainer.checkpoint import load_checkpoint
from trainer.class_images import ensure_class_images
from trainer.dreambooth import CHECKPOINT_NAME, TrainingRun, train
from trainer.engine import GenerationEngine
from trainer.family import FluxFamily, family_of
from trainer.lora_io import read_metadata
from trainer.pipelines import build_random_pipeline, flux_transformer_config, load_pipeline, save_random_model

HANDLE, CLASS = "sks", "woman"
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides) -> TrainConfig:
    """A 64 px tiny-flux config; what is left to the family (LoRA targets, no prior) follows Flux."""
    base = {"steps": 6, "resolution": 64, "rank": 4, "num_class_images": 2, "class_image_steps": 2,
            "checkpoint_every": 0, "learning_rate": 1e-3}
    chosen = {**base, **overrides}
    return TrainConfig(**chosen, family_defaults=left_to_family(chosen))


def run_train(tmp_path: Path, config: TrainConfig, tag: str = "run", pipe=None, **kwargs):
    return train(training_photos(), HANDLE, CLASS, config, pipeline=pipe or build_random_pipeline("tiny-flux"),
                 base_model="tiny-flux", out_dir=tmp_path / tag / "out", work_dir=tmp_path / tag / "work",
                 class_cache_dir=tmp_path / "class-cache", device="cpu", **kwargs)


def test_tiny_flux_is_a_flux_pipeline_with_offline_tokenizers(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny-flux")
    assert isinstance(family_of(pipe), FluxFamily) and pipe.transformer.config.guidance_embeds
    ids = pipe.tokenizer_2("a photo of zqx woman").input_ids
    assert ids[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.unk_token_id not in ids
    assert pipe.tokenizer_2.model_max_length == 512
    # Saved as a diffusers folder, it loads back like any base model, with the same weights.
    folder = save_random_model("tiny-flux", tmp_path / "model")
    loaded = load_pipeline(str(folder), device="cpu")
    assert isinstance(family_of(loaded), FluxFamily)
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert loaded.tokenizer_2("a photo of zqx woman").input_ids == ids


def test_flux_random_has_the_flux1_dev_transformer() -> None:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux_transformer_config())  # type: ignore[arg-type]
    count = sum(p.numel() for p in transformer.parameters())
    assert 11.8e9 < count < 12.0e9, count  # FLUX.1-dev's transformer: 11.9B parameters
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38


def test_flux_trains_its_transformer_and_saves_both_formats(tmp_path: Path) -> None:
    config = small(steps=40, learning_rate=1e-2, alpha=8)
    assert not config.prior_preservation or "prior_preservation" in config.family_defaults
    result = run_train(tmp_path, config)
    assert result.steps == 40 and np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    meta = read_metadata(result.lora_path)
    assert (meta["family"], meta["rank"], meta["alpha"]) == ("flux", "4", "8")
    tensors = load_file(result.lora_path)
    # PEFT's keys, as diffusers' Flux script saves them, on every targeted kind of projection.
    layers = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    assert {layer.split(".", 2)[2] for layer in layers} == set(FAMILY_DEFAULTS["flux"]["lora_targets"])
    assert all(k.startswith("transformer.") for k in tensors)
    kohya = load_file(result.kohya_path)
    assert read_metadata(result.kohya_path)["ss_base_model_version"] == "flux1"
    assert {k.rsplit(".", 2)[0] for k in kohya} == {
        *(f"lora_unet_double_blocks_0_{n}" for n in flux_kohya.DOUBLE_BLOCK if "mod_lin" not in n),
        "lora_unet_single_blocks_0_linear1"}


def test_diffusers_reads_the_lora_as_the_engine_merges_it(tmp_path: Path) -> None:
    """diffusers' Flux loader, fused, gives the weights the engine's merge gives."""
    result = run_train(tmp_path, small(steps=4, learning_rate=1e-2, alpha=8))
    pipe = build_random_pipeline("tiny-flux")
    lora = merged_lora.read_lora(result.lora_path, {"transformer": pipe.transformer})
    with merged_lora.merged(lora):
        ours = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(result.lora_path))
    pipe.fuse_lora(lora_scale=1.0)
    theirs = {k.replace("base_layer.", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert sum(not torch.equal(base[k], ours[k]) for k in base) == 15  # the 15 targeted layers
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-5, atol=1e-6)


def test_the_kohya_layout_splits_back_into_the_trained_layers() -> None:
    """On FLUX.1-dev's shapes (diffusers' kohya converter knows only those): a LoRA of one double and
    one single block, written in kohya's layout and read back by diffusers, has the same updates."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux_transformer_config())  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    rank, alpha, state = 2, 4.0, {}
    for prefix, layer in [("transformer_blocks.0", p) for p in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                               "attn.add_v_proj", "ff.net.2")] + [
            ("single_transformer_blocks.3", p) for p in ("attn.to_q", "attn.to_k", "attn.to_v")]:
        module = transformer.get_submodule(f"{prefix}.{layer}")
        state[f"{prefix}.{layer}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen)
        state[f"{prefix}.{layer}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen)
    kohya = flux_kohya.transformer_to_kohya(state, transformer, alpha)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for key in (k for k in state if k.endswith(".lora_A.weight")):
        layer = key.removesuffix(".lora_A.weight")
        expected = alpha / rank * state[f"{layer}.lora_B.weight"] @ state[key]
        got = converted[f"transformer.{layer}.lora_B.weight"] @ converted[f"transformer.{layer}.lora_A.weight"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The fused layers' untrained parts (the value projection of the text, the single block's MLP) add nothing.
    for layer in ("transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.3.proj_mlp"):
        got = converted[f"transformer.{layer}.lora_B.weight"] @ converted[f"transformer.{layer}.lora_A.weight"]
        assert not got.any()


def test_untrained_parts_of_a_fused_kohya_layer_are_made_where_the_lora_is() -> None:
    """A training on a GPU hands its LoRA over on the GPU: the zeros standing for a fused layer's
    untrained parts (the single block's MLP) must be made there too, or joining them fails. The meta
    device stands in for the GPU."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux_transformer_config())  # type: ignore[arg-type]
        state = {}
        for layer in ("attn.to_q", "attn.to_k", "attn.to_v"):
            module = transformer.get_submodule(f"single_transformer_blocks.0.{layer}")
            state[f"single_transformer_blocks.0.{layer}.lora_A.weight"] = torch.empty(2, module.in_features)
            state[f"single_transformer_blocks.0.{layer}.lora_B.weight"] = torch.empty(module.out_features, 2)
    kohya = flux_kohya.transformer_to_kohya(state, transformer, 2.0)
    down, up = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"], kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.device.type == up.device.type == "meta"
    assert down.shape[0] == up.shape[1] == 4 * 2  # q, k, v and the untrained MLP, rank 2 each


def test_a_resumed_flux_training_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = run_train(tmp_path, small(steps=6, checkpoint_every=3), tag="whole")
    first = run_train(tmp_path, small(steps=3, checkpoint_every=3), tag="first")
    checkpoint = tmp_path / "first" / "work" / CHECKPOINT_NAME
    assert load_checkpoint(checkpoint).step == 3
    resumed = run_train(tmp_path, small(steps=6, checkpoint_every=3), tag="resumed", resume_from=checkpoint)
    assert first.losses == whole.losses[:3]
    assert resumed.losses == whole.losses  # bit for bit, the history included
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prior", [False, True])
def test_cached_flux_training_equals_the_plain_recipe(tmp_path: Path, prior: bool) -> None:
    """Latents and prompts encoded once give the losses of train_dreambooth_lora_flux.py's step,
    which runs the VAE every step (prior preservation is off by default, and supported)."""
    config = small(steps=5, prior_preservation=prior, learning_rate=1e-2)
    run = TrainingRun(training_photos(), HANDLE, CLASS, config, base_model="tiny-flux", out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cache", on_event=events.ignore,
                      should_cancel=lambda: False, resume_from=None)
    with run.session(build_random_pipeline("tiny-flux")):
        assert run.config.prior_preservation == prior and not run.compiles
        cached = [run.train_step().item() for _ in range(config.steps)]
    pipe = build_random_pipeline("tiny-flux")
    class_paths = ensure_class_images(pipe, "tiny-flux", f"a photo of a {CLASS}", 64, 2, tmp_path / "cache").paths
    recipe = recipe_for(pipe, training_photos(), run.config, class_paths if prior else [])
    plain = [recipe.step().item() for _ in range(config.steps)]
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    assert len(set(cached)) == config.steps


def test_the_engine_draws_flux_pictures_with_the_lora_merged(tmp_path: Path) -> None:
    lora = run_train(tmp_path, small(steps=10, learning_rate=3e-2, alpha=8)).lora_path
    pipe = build_random_pipeline("tiny-flux")
    engine = GenerationEngine(pipe)
    assert (engine.base_resolution, engine.size_multiple) == (64, 16)
    request = GenerateRequest(prompt="on the moon", seed=3, steps=2, guidance=3.5)
    seen: list[events.Event] = []
    base = engine.generate(request, on_event=seen.append)
    person = engine.generate(request, adapter_key="sks", lora_path=lora, handle=HANDLE, class_word=CLASS)
    again = engine.generate(request, adapter_key="sks", handle=HANDLE, class_word=CLASS)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = engine.generate(request)

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    assert pixels(base[0].png).shape == (64, 64, 3)
    assert np.abs(pixels(base[0].png) - pixels(person[0].png)).max() > 0  # the LoRA changes the picture
    assert person[0].png == again[0].png and plain[0].png == base[0].png  # resident; unmerged exactly
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    assert [e.step for e in seen if e.type == "progress"] == [1, 2]
    portrait = engine.generate(GenerateRequest(prompt="x", seed=1, steps=1, aspect="portrait"))
    assert Image.open(io.BytesIO(portrait[0].png)).size == engine.image_size("portrait")
    # Flux's image-to-image draws its default 1024 px unless told the size: variations and upscales keep theirs.
    variation = engine.generate(request, adapter_key="sks", init_image=base[0].png)
    assert Image.open(io.BytesIO(variation[0].png)).size == (64, 64)
    upscaled = engine.upscale(request, base[0].png, adapter_key="sks")
    assert Image.open(io.BytesIO(upscaled[0].png)).size == (128, 128)


def test_a_flux_picture_is_drawn_at_its_distilled_guidance_and_says_so_as_forge_does() -> None:
    engine = GenerationEngine(build_random_pipeline("tiny-flux"))
    unnamed = engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=1))[0]
    assert unnamed.png == engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=1, guidance=3.5))[0].png
    assert unnamed.png != engine.generate(GenerateRequest(prompt="on the moon", seed=3, steps=1, guidance=7.0))[0].png
    text = Image.open(io.BytesIO(unnamed.png)).info[png_parameters.KEY]
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5," in text
    settings = png_parameters.parse(text)
    assert (settings.scheduler, settings.guidance) == (png_parameters.FLOW_SAMPLER, 3.5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_flux_step_never_lets_attention_pick_cudnn(tmp_path: Path, checkpointing: bool) -> None:
    """cuDNN's attention backward fails on Flux's joint attention on an H100 (bench/RESULTS.md): the
    step's forward and its backward (which runs a checkpointed forward again) see it switched off,
    and the switch is as it was after the training. Recorded from the attention's own forward."""
    pipe = build_random_pipeline("tiny-flux")
    seen: list[bool] = []
    for block in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks):
        block.attn.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    run_train(tmp_path, small(steps=2, gradient_checkpointing=checkpointing), pipe=pipe)
    assert seen and not any(seen)  # no attention of the steps (nor any other: a Flux training draws none here)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_text_encoders_and_vae_wait_off_the_device_while_the_steps_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the embeddings cached, a Flux training parks T5, CLIP and the VAE (in host memory on a
    GPU; here the CPU stands in for both); a picture between steps, and a preview, bring them back."""
    from trainer import offload

    monkeypatch.setattr(offload, "parking_place", lambda device: torch.device("cpu"))
    pipe = build_random_pipeline("tiny-flux")
    frozen = [pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
    engine = GenerationEngine(pipe)
    t5_calls: list[bool] = []  # whether T5 was parked when it ran
    pipe.text_encoder_2.register_forward_pre_hook(lambda module, args: t5_calls.append(offload.is_parked(module)))
    drawn: list[int] = []  # pictures served between steps
    progress: list[bool] = []  # whether all were parked at each step's progress report

    def serve() -> None:
        if not drawn and all(offload.is_parked(m) for m in frozen):  # once, in the middle of the training
            drawn.append(len(engine.generate(GenerateRequest(prompt="on the moon", seed=1, steps=1))))

    def on_event(event: events.Event) -> None:
        if event.type == "progress" and event.stage == "training":
            progress.append(all(offload.is_parked(m) for m in frozen))

    cached = len(t5_calls)
    result = run_train(tmp_path, small(steps=4, preview_every=2, checkpoint_every=1), pipe=pipe,
                       serve_riders=serve, on_event=on_event)
    assert result.steps == 4 and drawn == [1]
    assert progress == [True] * 4  # parked through every step
    # T5 ran only unparked: for the cache, the picture and the previews.
    assert len(t5_calls) > cached and not any(t5_calls)
    assert not any(offload.is_parked(m) for m in frozen)  # all back once the training is over



def test_a_flux_single_file_is_told_apart_and_needs_the_rest_of_flux1(tmp_path: Path) -> None:
    """Black Forest Labs' single files hold the transformer only: the rest comes from FLUX.1-dev's
    repository, which offline and uncached is explained rather than mistaken for an SD checkpoint."""
    from safetensors.torch import save_file

    from trainer.errors import ModelUnavailable
    from trainer.pipelines import FLUX_COMPONENTS, is_flux_single_file

    flux, sd = tmp_path / "flux1-dev.safetensors", tmp_path / "sd.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(2)}, str(flux))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, str(sd))
    assert is_flux_single_file(flux) and not is_flux_single_file(sd)
    with pytest.raises(ModelUnavailable, match=f"FLUX.1 checkpoint.*{FLUX_COMPONENTS}"):
        load_pipeline(str(flux), device="cpu", offline=True)


def test_flux_prompts_may_be_as_long_as_t5_reads() -> None:
    """Flux reads the prompt through T5 (512 tokens): a prompt past CLIP's 77 is drawn, not refused."""
    from trainer.errors import PromptTooLong
    from trainer.prompts import count_tokens

    pipe = build_random_pipeline("tiny-flux")
    engine = GenerationEngine(pipe)
    long = "a very detailed portrait in warm light " * 12
    assert count_tokens(pipe.tokenizer, long) > 77
    engine.check_prompt(long)
    with pytest.raises(PromptTooLong, match="at most 512"):
        engine.check_prompt(long * 7)


def test_clip_trains_with_the_transformer_and_checkpointing_changes_nothing(tmp_path: Path) -> None:
    """With `train_text_encoder`, CLIP gets a LoRA (T5 none, as in diffusers' Flux script); gradient
    checkpointing recomputes the same forward."""
    plain = run_train(tmp_path, small(steps=3, train_text_encoder=True), tag="plain")
    checkpointed = run_train(tmp_path, small(steps=3, train_text_encoder=True, gradient_checkpointing=True),
                             tag="checkpointed")
    np.testing.assert_allclose(checkpointed.losses, plain.losses, rtol=1e-6)
    components = {k.split(".", 1)[0] for k in load_file(plain.lora_path)}
    assert components == {"transformer", "text_encoder"}
    assert any(k.startswith("lora_te1_") for k in load_file(plain.kohya_path))


def test_the_command_line_makes_trains_and_draws_a_flux_model(tmp_path: Path) -> None:
    """`make-model tiny-flux`, `train` and `imagine` on its folder, as an operator would try Flux."""
    from tests.photos_factory import colour_fields
    from trainer.cli import run

    model = tmp_path / "tiny-flux"
    assert run(["make-model", "tiny-flux", str(model)]) == [f"model: {model}"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(colour_fields(5, 512, cells=6, seed=1)):
        photo.save(photos / f"photo{i}.png")
    out = tmp_path / "lora"
    lines = run(["train", "--photos", str(photos), "--handle", "sks", "--class", "woman", "--out", str(out),
                 "--model", str(model), "--steps", "2", "--resolution", "64", "--rank", "4", "--device", "cpu",
                 "--class-cache", str(tmp_path / "cache")])
    assert lines[:3] == [f"lora: {out / 'pytorch_lora_weights.safetensors'}", f"kohya: {out / 'sks.safetensors'}",
                         "steps: 2"]
    assert read_metadata(out / "pytorch_lora_weights.safetensors")["family"] == "flux"
    drawn = run(["imagine", "a portrait of sks", "--lora", str(out), "--model", str(model), "--out",
                 str(tmp_path / "pictures"), "--n", "1", "--steps", "2", "--seed", "7", "--device", "cpu"])
    assert len(drawn) == 1 and Image.open(drawn[0].removeprefix("image: ")).size == (64, 64)


def test_a_flux_worker_has_nothing_to_compile_at_its_start(tmp_path: Path) -> None:
    """Where an SD worker would compile its generation stages and training step (a backend named
    compiles them off CUDA too), a Flux worker runs its transformer eagerly: nothing to compile."""
    from jobs.worker_config import WorkerConfig
    from trainer.worker import Worker

    def worker(model: str) -> Worker:
        return Worker(WorkerConfig(model, "cpu", str(tmp_path / model), str(tmp_path / "classes"), train_rank=4,
                                   compile_backend="eager"))

    # What `prepare` would compile in the background (not started here: it would outlive the test).
    assert worker("tiny").compile_parts()
    assert worker("tiny-flux").compile_parts() == []


def test_targets_kohya_has_no_name_for_leave_only_the_diffusers_file(tmp_path: Path) -> None:
    result = run_train(tmp_path, small(steps=1, lora_targets=("attn.to_q", "x_embedder")))
    assert result.kohya_path is None
    assert any(".x_embedder." in k for k in load_file(result.lora_path))
