"""The training step with the UNet's stages compiled (TrainConfig.compiled_stages), on the tiny model.

Inductor pays only on a GPU (tests/trainer/test_gpu.py and bench/train_speed.py run it there). Here the
stages go through AOT autograd with a counting backend, which checks the wiring: the same losses as
the plain stages, the compiled code in place only for the step, one compile per process rather than
per training, and a worker that compiles before it takes jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.requests import TrainConfig
from jobs.worker_config import WorkerConfig
from tests.trainer.test_dreambooth import run_train, small
from tests.work_items import train_item
from trainer import dreambooth
from trainer.compiled_blocks import for_training
from trainer.fused_linears import LINEAR_TARGETS
from trainer.pipelines import build_random_pipeline
from trainer.worker import Worker


class CountingAot:
    """AOT autograd (forward and backward graphs, as inductor gets them) run as traced, counting
    the graphs dynamo hands over and the GEMMs (linears, batched products, convolutions) and the
    convolutions in them."""

    def __init__(self) -> None:
        self.graphs = 0
        self.gemms = 0
        self.convolutions = 0
        self._inner = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        calls = [node.target for node in gm.graph.nodes if node.op == "call_function"]
        self.convolutions += sum(target is torch.conv2d for target in calls)
        self.gemms += sum(target in LINEAR_TARGETS or target in (torch.bmm, torch.conv2d) for target in calls)
        return self._inner(gm, example_inputs)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def stages_overridden(pipe: Any) -> list[bool]:
    unet = pipe.unet
    return ["forward" in vars(stage) for stage in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]]


def test_compiling_is_on_where_the_step_is_graphed_unless_the_config_says_otherwise() -> None:
    assert TrainConfig().compiles_on("cuda") and not TrainConfig().compiles_on("cpu")
    assert not TrainConfig(cuda_graphs=False).compiles_on("cuda")
    assert not TrainConfig(gradient_checkpointing=True).compiles_on("cuda")
    assert not TrainConfig(train_text_encoder=True).compiles_on("cuda")
    assert not TrainConfig(compiled_stages=False).compiles_on("cuda")
    assert TrainConfig(compiled_stages=True).compiles_on("cpu")


@pytest.mark.slow  # torch.compile
def test_compiled_stages_train_like_plain_ones_and_a_second_training_compiles_nothing(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny")
    plain = run_train(tmp_path, small(steps=3), pipe=pipe, tag="plain")
    backend = CountingAot()
    seen: list[list[bool]] = []

    def serve_riders() -> None:  # generations served here must meet the plain stages
        seen.append(stages_overridden(pipe))

    config = small(steps=3, compiled_stages=True)
    told: dict[str, list[str]] = {"first": [], "second": []}

    def training_stages(tag: str) -> Callable[[dict], None]:
        def sink(event: dict) -> None:
            if event.type == "stage" and event.stage == "training":
                told[tag].append(event.detail)
        return sink

    first = run_train(tmp_path, config, pipe=pipe, tag="first", compile_backend=backend,
                      serve_riders=serve_riders, on_event=training_stages("first"))
    compiled = backend.graphs
    assert compiled >= len(stages_overridden(pipe))  # every stage went through the compiler
    second = run_train(tmp_path, config, pipe=pipe, tag="second", compile_backend=backend,
                       on_event=training_stages("second"))
    assert backend.graphs == compiled  # the next training (new adapter layers) reuses the code
    # The person waiting on the compile is told why, and the notice is gone once it is done.
    assert told == {"first": ["", dreambooth.COMPILING, ""], "second": [""]}
    assert seen and not any(any(step) for step in seen) and not any(stages_overridden(pipe))
    for losses in (first.losses, second.losses):
        assert torch.allclose(torch.tensor(losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # torch.compile
def test_the_step_fuses_the_projections_that_share_an_input_and_trains_the_same(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny")
    runs = {}
    for fused in (True, False):
        backend = CountingAot()
        result = run_train(tmp_path, small(steps=3, prior_preservation=False, compiled_stages=True,
                                           fused_linears=fused), pipe=pipe, tag=str(fused), compile_backend=backend)
        runs[fused] = (backend.gemms, backend.convolutions, result.losses)
    # Per self-attention: q, k, v, their three A and their three B matrices become three GEMMs
    # instead of nine. The cross-attentions of a stage all read the text: their k and v, their A
    # and their B matrices become three GEMMs per stage. The 1x1 convolutions become linears.
    unet = pipe.unet
    saved = pointwise = 0
    for stage in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        cross = sum(name.endswith("attn2") for name, _ in stage.named_modules())
        saved += 6 * cross + (3 * (2 * cross - 1) if cross else 0)
        pointwise += sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == m.stride == (1, 1) and m.groups == 1
                         for m in stage.modules())
    assert saved and runs[False][0] - runs[True][0] == saved
    assert pointwise and runs[False][1] - runs[True][1] == pointwise
    assert torch.allclose(torch.tensor(runs[True][2]), torch.tensor(runs[False][2]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # torch.compile
def test_the_warm_up_compiles_what_a_training_of_that_config_runs(tmp_path: Path) -> None:
    pipe = build_random_pipeline("tiny")
    backend = CountingAot()
    config = small(steps=2, compiled_stages=True)
    assert dreambooth.warm_up(pipe, replace(config, compiled_stages=False), tmp_path / "off") == 0.0
    assert backend.graphs == 0
    assert dreambooth.warm_up(pipe, config, tmp_path / "warm-up", compile_backend=backend) > 0
    warmed = backend.graphs
    assert warmed > 0 and not any(stages_overridden(pipe))
    result = run_train(tmp_path, config, pipe=pipe, compile_backend=backend)
    assert backend.graphs == warmed and result.steps == 2
    assert for_training(pipe, backend) is for_training(pipe, backend)


def test_a_worker_compiles_the_training_in_the_background_unless_told_not_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off CUDA only a backend other than inductor compiles ("eager" here); no helper has room on a
    CPU, so the worker compiles the training step itself, after its start, while no job runs."""
    warmed: list[TrainConfig] = []
    trained: list[TrainConfig] = []
    monkeypatch.setattr(dreambooth, "warm_up", lambda pipe, config, scratch, **kw: warmed.append(config) or 1.0)

    def fake_train(photos: Any, handle: str, class_word: str, config: TrainConfig, **kwargs: Any) -> Any:
        trained.append(config)
        raise dreambooth.Cancelled()

    monkeypatch.setattr(dreambooth, "train", fake_train)
    item = train_item(1, config=TrainConfig(steps=50, rank=8))
    heard: list[list[str]] = []
    reported: list[list[str]] = []
    for compile_training in (True, False):
        worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c"),
                                     compile_training=compile_training, train_rank=8, compile_backend="eager",
                                     compile_generation=False))
        heard.append([])
        report = worker.prepare(on_part=heard[-1].append)
        assert worker.wait_compiled(timeout=120)
        reported.append(report.names())
        worker.execute(item, lambda _event: None, lambda: False)
    assert [config.rank for config in warmed] == [8]  # the bot's rank, once
    assert [config.compiled_stages for config in warmed] == [True]
    assert heard == [["loading the base model"]] * 2  # all that those waiting for a start wait for
    assert reported == [["model", "training"], ["model"]]  # and each part's time
    assert [config.compiled_stages for config in trained] == [True, False]
    assert not list((tmp_path / "w").glob("warm-up-*"))  # its scratch files are gone


def test_the_estimate_of_time_left_leaves_out_the_first_steps_compiling(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock where the first step's capture takes 100 s and every step 1 s, the first estimate
    is 1 s per remaining step, not 101."""
    clock = {"now": 0.0}
    monkeypatch.setattr(dreambooth, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock["now"])}))
    step = dreambooth.TrainingRun.train_step

    def timed_step(run: dreambooth.TrainingRun) -> torch.Tensor:
        if run.capture_s is None:
            run.capture_s = 100.0
            clock["now"] += 100.0
        clock["now"] += 1.0
        return step(run)

    monkeypatch.setattr(dreambooth.TrainingRun, "train_step", timed_step)
    seen: list[dict] = []
    run_train(tmp_path, small(steps=4, prior_preservation=False), on_event=seen.append)
    assert [(e.step, e.eta_s) for e in seen if e.type == "progress"] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.0)]


def _trained(out_dir: Path, lora: bytes) -> Any:
    """What `dreambooth.train` returns, its LoRA file written, for a worker around a faked training."""
    out_dir.mkdir(parents=True)
    (out_dir / "lora.safetensors").write_bytes(lora)
    return type("Result", (), {"lora_path": out_dir / "lora.safetensors", "kohya_path": None,
                               "metadata": {}, "steps": 50, "final_loss": 0.1})()


def _worker_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_train: Any) -> Worker:
    monkeypatch.setattr(dreambooth, "train", fake_train)
    worker = Worker(WorkerConfig("tiny", "cpu", str(tmp_path / "w"), str(tmp_path / "c")))
    worker._pipeline = "pipe"
    return worker


def test_a_model_whose_sample_pictures_fail_is_kept_without_them(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The training is done and its LoRA saved when the samples are drawn: running out of memory
    there (or any other failure) must not throw the model away."""
    worker = _worker_around(tmp_path, monkeypatch,
                            lambda *args, out_dir, **kwargs: _trained(out_dir, b"the person's LoRA"))

    def out_of_memory(*args: Any) -> list[dict]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    def cancelled(*args: Any) -> list[dict]:
        raise dreambooth.Cancelled()

    item = train_item(1)
    outcomes = []
    for failure in (out_of_memory, cancelled):
        seen: list[dict] = []
        monkeypatch.setattr(worker, "_samples", failure)
        worker.execute(item, seen.append, lambda: False)
        outcomes.append(seen[-1])
    assert outcomes[0].type == "done" and outcomes[0].result.lora == b"the person's LoRA"
    assert outcomes[0].result.samples == []
    assert (outcomes[1].type, outcomes[1].code) == ("error", "cancelled")  # a cancel still cancels


def test_a_checkpoint_that_cannot_be_used_costs_its_progress_not_the_job(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged archive, or one the trainer refuses (made for another base model, say): the worker
    trains from the first step instead of failing the person's job."""
    import io
    import zipfile

    resumed_from: list[Any] = []

    def fake_train(photos: Any, handle: str, class_word: str, config: TrainConfig, *, out_dir: Path,
                   resume_from: Path | None, **kwargs: Any) -> Any:
        resumed_from.append(resume_from)
        if resume_from is not None:
            raise dreambooth.BadCheckpoint("The checkpoint was made with different settings (base_model).")
        return _trained(out_dir, b"LoRA")

    worker = _worker_around(tmp_path, monkeypatch, fake_train)
    monkeypatch.setattr(worker, "_samples", lambda *args: [])
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("checkpoint.safetensors", b"from the old base model")
    for blob in (b"PK\x03\x04 cut short", packed.getvalue()):
        resumed_from.clear()
        seen: list[dict] = []
        worker.execute(train_item(3, checkpoint=blob), seen.append, lambda: False)
        assert seen[-1].type == "done" and seen[-1].result.lora == b"LoRA"
        assert resumed_from[-1] is None and len(resumed_from) == (1 if blob.startswith(b"PK\x03\x04 ") else 2)
