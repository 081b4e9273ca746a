"""Base models: the random offline pipelines, the tokenizer, and loading with clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from trainer import pipelines
from trainer.errors import DeviceUnavailable, ModelUnavailable
from trainer.tokenizer.build_vocab import build


def test_tokenizer_files_match_their_generator(tmp_path: Path) -> None:
    build(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (pipelines.TOKENIZER_DIR / name).read_text(
            encoding="utf-8"), f"{name} is stale: run python -m trainer.tokenizer.build_vocab"


def test_tokenizer_round_trips_prompts_in_77_tokens() -> None:
    tok = pipelines.load_tokenizer()
    ids = tok("A photo of sks woman, highly detailed portrait", padding="max_length", max_length=77,
              truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == (
        "a photo of sks woman, highly detailed portrait")
    # Learned merges make common words single tokens, as the real CLIP vocabulary does.
    assert tok.tokenize("portrait photo") == ["portrait</w>", "photo</w>"]
    json.loads((pipelines.TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))


def test_tiny_pipeline_generates_64px_with_sd_latent_shapes() -> None:
    pipe = pipelines.build_random_pipeline("tiny")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.vae_scale_factor == 8 and pipe.safety_checker is None
    out = pipe("a photo of a woman", num_inference_steps=2, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 8, 8)


def test_random_builds_are_reproducible_from_the_seed() -> None:
    a = pipelines.build_random_pipeline("tiny", seed=3).unet.state_dict()
    b = pipelines.build_random_pipeline("tiny", seed=3).unet.state_dict()
    c = pipelines.build_random_pipeline("tiny", seed=4).unet.state_dict()
    key = "conv_in.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_tiny_sdxl_has_two_encoders_and_runs() -> None:
    pipe = pipelines.build_random_pipeline("tiny-sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    out = pipe("a photo of a man", num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert out.shape == (1, 4, 8, 8)


def test_sd15_random_has_the_real_architecture() -> None:
    pipe = pipelines.build_random_pipeline("sd15-random", device="meta")
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert (te.config.hidden_size, te.config.num_hidden_layers, te.config.vocab_size) == (768, 12, 49408)
    # Parameter counts of the published SD1.5 UNet, VAE and CLIP ViT-L/14 text encoder.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te)) == (859_520_964, 83_653_863, 123_060_480)


def test_sdxl_random_has_the_real_architecture() -> None:
    pipe = pipelines.build_random_pipeline("sdxl-random", device="meta")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    unet, vae, te, te2 = pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280)
    assert tuple(unet.config.transformer_layers_per_block) == (1, 2, 10)
    assert unet.config.cross_attention_dim == 2048 and unet.config.sample_size == 128
    assert vae.config.scaling_factor == 0.13025 and vae.config.sample_size == 1024
    assert (te2.config.hidden_size, te2.config.num_hidden_layers, te2.config.projection_dim) == (1280, 32, 1280)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    # Parameter counts of the published SDXL base 1.0 UNet, VAE and its two text encoders.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te), count(te2)) == (2_567_463_684, 83_653_863, 123_060_480,
                                                                694_659_840)


def test_saved_tiny_model_loads_back_identically(tmp_path: Path) -> None:
    original = pipelines.save_random_model("tiny", tmp_path / "tiny")
    loaded = pipelines.load_pipeline(str(original))
    fresh = pipelines.build_random_pipeline("tiny")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(fresh, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()


def test_missing_folder_is_model_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        pipelines.load_pipeline(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="model_index.json"):
        pipelines.load_pipeline(str(tmp_path / "empty"))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unknown_hub_id_offline_is_model_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable, match="offline"):
        pipelines.load_pipeline("nobody-here/no-such-model")


def test_missing_single_file_is_model_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        pipelines.load_pipeline(str(tmp_path / "model.safetensors"))


def test_device_and_dtype_choice() -> None:
    assert pipelines.pick_device("cpu") == "cpu"
    assert pipelines.pick_dtype("cpu") == torch.float32
    assert pipelines.pick_device("auto") == ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="CUDA"):
            pipelines.pick_device("cuda")
    with pytest.raises(DeviceUnavailable):
        pipelines.pick_device("tpu")


def test_single_file_family_is_read_from_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "v1.safetensors")
    assert pipelines._is_sdxl_single_file(tmp_path / "xl.safetensors")
    assert not pipelines._is_sdxl_single_file(tmp_path / "v1.safetensors")


def test_unusable_single_files_are_model_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelUnavailable, match="junk.safetensors"):
        pipelines.load_pipeline(str(tmp_path / "junk.safetensors"))
    # A plausible SD1 checkpoint still needs its configuration, which offline mode cannot fetch.
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
              tmp_path / "v1.safetensors")
    with pytest.raises(ModelUnavailable, match="configuration"):
        pipelines.load_pipeline(str(tmp_path / "v1.safetensors"))
