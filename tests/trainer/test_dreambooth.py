"""LoRA DreamBooth on the tiny model: learning, files, resume, cancel, caches, events, SDXL."""

from __future__ import annotations

import errno
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from bench.train_speed import recipe_for
from jobs import events
from jobs.requests import TrainConfig
from jobs.train_defaults import FAMILY_DEFAULTS, left_to_family
from tests.photos_factory import training_photos
from trainer.checkpoint import load_checkpoint
from trainer.class_images import cache_key, ensure_class_images
from trainer.dreambooth import CHECKPOINT_NAME, TrainingRun, instance_prompt, train
from trainer.errors import BadCheckpoint, BadPhoto, Cancelled, DiskFull, OutOfMemory, TooFewPhotos
from trainer.file_writes import write_atomic
from trainer.lora_io import read_metadata
from trainer.pipelines import build_random_pipeline

HANDLE, CLASS = "sks", "woman"


def small(**overrides) -> TrainConfig:
    """A config for 64 px tiny-model runs with only a couple of cheap class images."""
    base = {"steps": 6, "resolution": 64, "rank": 4, "num_class_images": 2, "class_image_steps": 2,
            "checkpoint_every": 0, "learning_rate": 1e-3}
    return TrainConfig(**{**base, **overrides})


def run_train(tmp_path: Path, config: TrainConfig, pipe=None, tag: str = "run", **kwargs):
    return train(training_photos(), HANDLE, CLASS, config, pipeline=pipe or build_random_pipeline("tiny"),
                 base_model="tiny", out_dir=tmp_path / tag / "out", work_dir=tmp_path / tag / "work",
                 class_cache_dir=tmp_path / "class-cache", device="cpu", **kwargs)


def generate(pipe, size: int = 64, steps: int = 3, seed: int = 0) -> np.ndarray:
    image = pipe(prompt=instance_prompt(HANDLE, CLASS), height=size, width=size, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


def test_training_reduces_the_instance_loss(tmp_path: Path) -> None:
    result = run_train(tmp_path, small(steps=100, learning_rate=1e-2, rank=8, prior_preservation=False))
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert len(result.losses) == 100 and result.steps == 100
    assert last < 0.85 * first, (first, last)


def test_lora_changes_the_image_and_loads_back_as_trained(tmp_path: Path) -> None:
    seen: list[events.Event] = []
    config = small(steps=20, learning_rate=1e-2, rank=4, alpha=8, train_text_encoder=True,
                   prior_preservation=False, preview_every=20, preview_steps=3)
    result = run_train(tmp_path, config, on_event=seen.append)
    # The preview at the last step was made with the LoRA still in memory.
    trained = np.asarray(Image.open(io.BytesIO(next(e.png for e in seen if e.type == "preview"))),
                         dtype=np.int16)

    pipe = build_random_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_lora_weights(str(result.lora_path.parent))
    loaded = generate(pipe)
    assert np.abs(loaded - base).mean() > 2.0  # the LoRA visibly changes the picture
    assert np.abs(loaded - trained).max() <= 1  # and the file reproduces the trained adapter (alpha too)


def test_lora_files_carry_metadata_and_kohya_keys(tmp_path: Path) -> None:
    result = run_train(tmp_path, small(steps=2, rank=4, alpha=2, train_text_encoder=True))
    meta = read_metadata(result.lora_path)
    assert result.lora_path.name == "pytorch_lora_weights.safetensors"
    assert {k: meta[k] for k in ("handle", "class_word", "base_model", "steps", "rank", "alpha")} == {
        "handle": HANDLE, "class_word": CLASS, "base_model": "tiny", "steps": "2", "rank": "4", "alpha": "2"}
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["created"]) and meta["format_version"] == "1"
    assert result.metadata["handle"] == HANDLE

    assert result.kohya_path is not None and result.kohya_path.name == f"{HANDLE}.safetensors"
    kohya = load_file(result.kohya_path)
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in kohya), [k for k in kohya if not pattern.match(k)][:3]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert all(float(v) == 2.0 for k, v in kohya.items() if k.endswith(".alpha"))
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    assert read_metadata(result.kohya_path)["ss_network_dim"] == "4"


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    config = small(steps=6, checkpoint_every=3, train_text_encoder=True, noise_offset=0.05)
    carried: dict[int, Path] = {}  # a new process gets only the checkpoint file the bot kept

    def keep(event: events.Event) -> None:
        if event.type == "checkpoint_saved":
            carried[event.step] = tmp_path / f"carried-{event.step}.safetensors"
            carried[event.step].write_bytes(Path(event.path).read_bytes())

    straight = run_train(tmp_path, config, tag="straight", on_event=keep)
    assert sorted(carried) == [3, 6] and load_checkpoint(carried[3]).step == 3
    resumed = run_train(tmp_path, config, tag="resumed", resume_from=carried[3])
    assert resumed.losses == straight.losses and resumed.steps == 6
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    # Stopped after its last step (saving, or drawing the sample pictures): nothing is trained again.
    seen: list[events.Event] = []
    finished = run_train(tmp_path, config, tag="finished", resume_from=carried[6], on_event=seen.append)
    assert finished.losses == straight.losses and finished.steps == 6
    assert not [e for e in seen if e.type == "progress" and e.stage == "training"]
    c = load_file(finished.lora_path)
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6


def test_bf16_training_keeps_fp32_masters_resumes_exactly_and_tracks_fp32(tmp_path: Path) -> None:
    """Under bf16 the LoRA layers compute in bf16 while the optimiser updates fp32 master weights."""
    config = small(steps=6, checkpoint_every=3, prior_preservation=False, learning_rate=1e-2)
    seen: list[torch.dtype] = []
    pipe = build_random_pipeline("tiny", dtype=torch.bfloat16)
    def look() -> None:  # once the adapter is in place (the first call comes before it is)
        to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        if hasattr(to_q, "lora_A"):
            seen.append(to_q.lora_A["dreambooth"].weight.dtype)

    bf16 = run_train(tmp_path, replace(config, mixed_precision="bf16"), pipe=pipe, tag="bf16", serve_riders=look)
    assert len(seen) == config.steps + 1 and set(seen) == {torch.bfloat16}
    saved = load_file(bf16.lora_path)
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the masters, not their bf16 rounding
    assert load_checkpoint(tmp_path / "bf16" / "work" / CHECKPOINT_NAME).params  # fp32 masters in checkpoints

    moved = tmp_path / "carried.safetensors"
    moved.write_bytes((tmp_path / "bf16" / "work" / CHECKPOINT_NAME).read_bytes())
    resumed = run_train(tmp_path, replace(config, mixed_precision="bf16"), tag="resumed", resume_from=moved,
                        pipe=build_random_pipeline("tiny", dtype=torch.bfloat16))
    assert resumed.losses == bf16.losses
    again = load_file(resumed.lora_path)
    assert all(torch.equal(again[k], saved[k]) for k in saved)

    fp32 = run_train(tmp_path, replace(config, mixed_precision="no"), tag="fp32")
    assert torch.allclose(torch.tensor(bf16.losses), torch.tensor(fp32.losses), rtol=0.1, atol=0.02), (
        bf16.losses, fp32.losses)


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path: Path) -> None:
    run_train(tmp_path, small(steps=4, checkpoint_every=2), tag="first")
    with pytest.raises(BadCheckpoint, match="rank"):
        run_train(tmp_path, small(steps=4, rank=8), tag="second",
                  resume_from=tmp_path / "first" / "work" / CHECKPOINT_NAME)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(BadCheckpoint):
        run_train(tmp_path, small(), tag="third", resume_from=tmp_path / "junk.safetensors")
    # The operator changed BASE_MODEL while the training waited: its LoRA belongs to the old one.
    with pytest.raises(BadCheckpoint, match="base_model"):
        train(training_photos(), HANDLE, CLASS, small(steps=4, checkpoint_every=2), pipeline=build_random_pipeline("tiny"),
              base_model="another-sd15-finetune", out_dir=tmp_path / "fourth" / "out",
              work_dir=tmp_path / "fourth" / "work", class_cache_dir=tmp_path / "class-cache", device="cpu",
              resume_from=tmp_path / "first" / "work" / CHECKPOINT_NAME)


def test_cancel_stops_within_one_step_and_restores_the_pipeline(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    calls = 0

    def cancel_on_third_check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    with pytest.raises(Cancelled):
        run_train(tmp_path, small(steps=50, checkpoint_every=1, prior_preservation=False), pipe=pipe,
                  should_cancel=cancel_on_third_check)
    assert load_checkpoint(tmp_path / "run" / "work" / CHECKPOINT_NAME).step == 2
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(pipe.unet, "peft_config")


def test_class_images_are_cached_per_model_class_and_resolution(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    cache = tmp_path / "cache"
    first = ensure_class_images(pipe, "tiny", "a photo of a woman", 64, 3, cache, steps=2)
    again = ensure_class_images(pipe, "tiny", "a photo of a woman", 64, 3, cache, steps=2)
    assert (first.generated, again.generated) == (3, 0) and first.paths == again.paths
    more = ensure_class_images(pipe, "tiny", "a photo of a woman", 64, 4, cache, steps=2)
    assert more.generated == 1  # only the missing one
    men = ensure_class_images(pipe, "tiny", "a photo of a man", 64, 2, cache, steps=2)
    assert men.generated == 2 and men.paths[0].parent != first.paths[0].parent
    assert cache_key("tiny", "a photo of a woman", 64) != cache_key("other", "a photo of a woman", 64)
    assert Image.open(first.paths[0]).size == (64, 64)
    assert not list(cache.rglob(".tmp-*"))
    first.paths[1].write_bytes(b"")  # left empty by a crash
    mended = ensure_class_images(pipe, "tiny", "a photo of a woman", 64, 3, cache, steps=2)
    assert mended.generated == 1 and Image.open(first.paths[1]).size == (64, 64)


def test_events_follow_the_stages_and_report_progress(tmp_path: Path) -> None:
    seen: list[events.Event] = []
    run_train(tmp_path, small(steps=4, checkpoint_every=2), on_event=seen.append)
    stages = [e.stage for e in seen if e.type == "stage"]
    assert stages == ["preparing", "class_images", "caching", "training", "saving"]
    progress = [e for e in seen if e.type == "progress" and e.stage == "training"]
    assert progress[-1].step == progress[-1].total == 4 and progress[-1].eta_s == 0
    assert all(e.loss > 0 and e.eta_s is not None for e in progress)
    assert [e.step for e in seen if e.type == "checkpoint_saved"] == [2, 4]  # the last step's too
    class_progress = [e for e in seen if e.type == "progress" and e.stage == "class_images"]
    assert class_progress[-1].step == class_progress[-1].total == 2

    # A second training of the same class reuses the cached class images.
    seen.clear()
    run_train(tmp_path, small(steps=1), tag="second", on_event=seen.append)
    assert not [e for e in seen if e.type == "progress" and e.stage == "class_images"]


@pytest.mark.parametrize(("kind", "prior"), [("tiny", True), ("tiny", False), ("tiny-sdxl", True)])
def test_cached_training_equals_the_plain_recipe(tmp_path: Path, kind: str, prior: bool) -> None:
    """Encoding once gives the same losses as running the VAE and text encoder every step (on SDXL:
    its fp32 VAE every step, its two text encoders once)."""
    config = small(steps=5, prior_preservation=prior, noise_offset=0.1, learning_rate=1e-2)
    run = TrainingRun(training_photos(), HANDLE, CLASS, config, base_model=kind, out_dir=tmp_path / "out",
                      work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cache", on_event=events.ignore,
                      should_cancel=lambda: False, resume_from=None)
    with run.session(build_random_pipeline(kind)):  # type: ignore[arg-type]
        cached = [run.train_step().item() for _ in range(config.steps)]

    pipe = build_random_pipeline(kind)  # type: ignore[arg-type]
    class_paths = ensure_class_images(pipe, kind, f"a photo of a {CLASS}", 64, 2, tmp_path / "cache").paths
    recipe = recipe_for(pipe, training_photos(), config, class_paths if prior else [])
    plain = [recipe.step().item() for _ in range(config.steps)]
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    assert len(set(cached)) == config.steps  # the steps really differ (fresh draws each step)


def test_too_few_photos_and_unreadable_photos_are_explained(tmp_path: Path) -> None:
    with pytest.raises(TooFewPhotos, match="at least 5"):
        train(training_photos(3), HANDLE, CLASS, small(), pipeline=build_random_pipeline("tiny"),
              out_dir=tmp_path, work_dir=tmp_path, class_cache_dir=tmp_path)
    photos: list = [*training_photos(4), b"this is not an image"]
    with pytest.raises(BadPhoto):
        train(photos, HANDLE, CLASS, small(), pipeline=build_random_pipeline("tiny"), out_dir=tmp_path,
              work_dir=tmp_path, class_cache_dir=tmp_path)


def test_photos_may_be_paths_bytes_or_images(tmp_path: Path) -> None:
    photos = training_photos()
    (tmp_path / "p0.png").parent.mkdir(exist_ok=True)
    photos[0].save(tmp_path / "p0.png")
    buffer = io.BytesIO()
    photos[1].save(buffer, format="JPEG")
    mixed = [tmp_path / "p0.png", buffer.getvalue(), *photos[2:]]
    result = train(mixed, HANDLE, CLASS, small(steps=1, prior_preservation=False),
                   pipeline=build_random_pipeline("tiny"), out_dir=tmp_path / "out", work_dir=tmp_path / "w",
                   class_cache_dir=tmp_path / "c")
    assert result.lora_path.exists()


def test_sdxl_trains_and_its_lora_loads(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny-sdxl")
    config = small(steps=2, train_text_encoder=True, learning_rate=1e-2)
    result = train(training_photos(), HANDLE, CLASS, config, pipeline=pipe, base_model="tiny-sdxl",
                   out_dir=tmp_path / "out", work_dir=tmp_path / "work", class_cache_dir=tmp_path / "cache")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    keys = load_file(result.lora_path).keys()
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("unet.") for k in keys)
    kohya = load_file(result.kohya_path)
    assert any(k.startswith("lora_te2_") for k in kohya) and any(k.startswith("lora_te1_") for k in kohya)
    fresh = build_random_pipeline("tiny-sdxl")
    fresh.load_lora_weights(str(result.lora_path.parent))
    out = fresh(prompt="a photo of sks woman", height=64, width=64, num_inference_steps=2,
                output_type="latent").images
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize(("kind", "resolution"), [("tiny", 64), ("tiny-sdxl", 96)])
def test_settings_left_to_the_base_model_follow_its_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           kind: str, resolution: int) -> None:
    # SDXL's real 1024 px would make a slow CPU test; what matters is whose value is taken.
    monkeypatch.setitem(FAMILY_DEFAULTS["sdxl"], "resolution", 96)
    config = small(steps=1, prior_preservation=False, family_defaults=left_to_family({}))
    result = train(training_photos(), HANDLE, CLASS, config, pipeline=build_random_pipeline(kind),
                   base_model=kind, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                   class_cache_dir=tmp_path / "cache")
    assert result.metadata["resolution"] == str(resolution)
    chosen = small(steps=1, prior_preservation=False, family_defaults=left_to_family({"resolution"}))
    result = train(training_photos(), HANDLE, CLASS, chosen, pipeline=build_random_pipeline(kind),
                   base_model=kind, out_dir=tmp_path / "out2", work_dir=tmp_path / "work2",
                   class_cache_dir=tmp_path / "cache")
    assert result.metadata["resolution"] == "64"  # chosen, so kept on either family


def test_config_round_trips_through_json_payloads() -> None:
    config = TrainConfig(steps=10, lora_targets=["to_q", "to_v"])  # type: ignore[arg-type]
    assert config.lora_targets == ("to_q", "to_v")
    assert TrainConfig(**config.to_dict()) == config
    left = TrainConfig(family_defaults=["resolution"])  # type: ignore[arg-type]
    assert left.family_defaults == ("resolution",) and TrainConfig(**left.to_dict()) == left
    with pytest.raises(ValueError):
        TrainConfig(resolution=100)


def test_out_of_memory_is_explained_and_the_pipeline_restored(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(self: TrainingRun) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainingRun, "train_step", exhausted)
    pipe = build_random_pipeline("tiny")
    with pytest.raises(OutOfMemory, match="resolution.*gradient checkpointing"):
        run_train(tmp_path, small(prior_preservation=False), pipe=pipe)
    assert not hasattr(pipe.unet, "peft_config")
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())


def test_a_failed_preview_is_skipped_and_the_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(self: TrainingRun) -> bytes:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(TrainingRun, "_preview", exhausted)
    seen: list[events.Event] = []
    result = run_train(tmp_path, small(steps=4, prior_preservation=False, preview_every=2), on_event=seen.append)
    assert result.steps == 4 and result.lora_path.is_file()
    assert not [e for e in seen if e.type in ("preview", "error")]


def test_a_full_disk_is_reported_as_disk_full(tmp_path: Path) -> None:
    def no_space(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match="disk is full"):
        write_atomic(tmp_path / "lora.safetensors", no_space, "trained model")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file is left

    def no_space_in_rust(path: Path) -> None:  # what safetensors' writer raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(DiskFull, match="disk is full"):
        write_atomic(tmp_path / "checkpoint.safetensors", no_space_in_rust, "training checkpoint")

    def unsupported(path: Path) -> None:
        raise SafetensorError("Error while serializing: unsupported dtype")

    with pytest.raises(SafetensorError):  # any other serializing error stays what it is
        write_atomic(tmp_path / "x.safetensors", unsupported)


def test_training_beside_loaded_adapters_is_isolated_and_leaves_them_as_they_were(tmp_path: Path) -> None:
    """A worker trains on the pipeline its generation engine has loaded people's LoRAs into."""
    other = run_train(tmp_path, small(steps=3, learning_rate=1e-2, train_text_encoder=True,
                                      prior_preservation=False), tag="other")
    clean = run_train(tmp_path, small(steps=3), tag="clean")

    pipe = build_random_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(other.lora_path.parent), adapter_name="other")
    before = generate(pipe)
    shared = run_train(tmp_path, small(steps=3), pipe=pipe, tag="shared")

    assert shared.losses == clean.losses  # the loaded adapter touched neither class images nor caches
    assert pipe.get_list_adapters() == {"unet": ["other"], "text_encoder": ["other"]}
    assert np.array_equal(generate(pipe), before)  # and it still works as before


def test_generations_served_between_steps_change_neither_the_training_nor_their_own_pictures(tmp_path: Path) -> None:
    """A worker serves /imagine between training steps on the same pipeline (see TrainingRun._interlude)."""
    from jobs.requests import GenerateRequest
    from trainer.engine import GenerationEngine

    other = run_train(tmp_path, small(steps=3, learning_rate=1e-2, train_text_encoder=True,
                                      prior_preservation=False), tag="other")
    config = small(steps=5, train_text_encoder=True)
    plain = run_train(tmp_path, config, tag="plain")
    request = GenerateRequest("on a horse", seed=7, steps=2)

    alone = GenerationEngine(build_random_pipeline("tiny"))
    expected = alone.generate(request, adapter_key="other", lora_path=other.lora_path, handle=HANDLE,
                              class_word=CLASS)[0].png

    pipe = build_random_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    engine = GenerationEngine(pipe)
    served: list[bytes] = []

    def serve() -> None:  # the first interlude loads the adapter, later ones find it resident
        served.append(engine.generate(request, adapter_key="other", lora_path=other.lora_path, handle=HANDLE,
                                      class_word=CLASS)[0].png)

    shared = run_train(tmp_path, config, pipe=pipe, tag="shared", serve_riders=serve)
    # Before each step, and within the other phases (tests/trainer/test_serving_between_phases.py)
    assert len(served) > config.steps and all(png == expected for png in served)
    assert shared.losses == plain.losses
    saved, reference = load_file(shared.lora_path), load_file(plain.lora_path)
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    # The adapter loaded during training survived its end and still draws the same picture.
    assert engine.loaded_adapters == ["other"]
    assert engine.generate(request, adapter_key="other", handle=HANDLE, class_word=CLASS)[0].png == expected
