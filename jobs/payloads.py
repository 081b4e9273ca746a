"""What travels between the bot and a worker: self-contained jobs and their results, as typed records.

A work item carries every byte the work needs (photos, the person's LoRA, a checkpoint to resume
from), so a worker needs no shared disk and no database; results come back as bytes too. The same
items go to a local child process and to workers on other machines. A job's parameters are also
what the bot stores with the job (`to_stored` / `from_stored`), so buttons work after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, Literal

from pydantic import TypeAdapter

from jobs.requests import GenerateRequest, TrainConfig

JobKind = Literal["train", "generate"]


@dataclass(frozen=True)
class TrainParams:
    """A training: who (handle and class word as trained), with which settings, and its sample pictures."""

    handle: str
    class_word: str
    config: TrainConfig
    sample_steps: int = 25
    samples: int = 2
    seed: int = 0


@dataclass(frozen=True)
class VariationOf:
    """The picture a variation ("More like #N") starts from: picture `index` of a stored generation."""

    generation_id: int
    index: int


@dataclass(frozen=True)
class GenerateParams:
    """A picture request, with the person's model (`adapter_key` names its LoRA on the workers)."""

    request: GenerateRequest
    model_id: int | None = None
    adapter_key: str | None = None
    handle: str | None = None
    class_word: str | None = None
    variation_of: VariationOf | None = None
    # Set: the job is an upscale (trainer.upscale) of that picture, the request its own with its seed.
    upscale_of: VariationOf | None = None
    # Where it was asked for, flagged pictures may be shown (bot.safety: an age-restricted channel the
    # operator opened to them); elsewhere they are neither stored nor sent.
    allow_flagged: bool = False


@dataclass(frozen=True)
class TrainInputs:
    """A training's bytes: the person's normalised photos (PNG), and a checkpoint to resume from."""

    photos: list[bytes] = field(repr=False)
    checkpoint: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GenerateInputs:
    """A picture request's bytes: the LoRA file (None when the worker holds it already), and the
    picture a variation or an upscale starts from."""

    lora: bytes | None = field(default=None, repr=False)
    init_image: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WorkItem:
    """One job for a worker."""

    job_id: int
    params: TrainParams | GenerateParams
    inputs: TrainInputs | GenerateInputs

    def __post_init__(self) -> None:
        expected = TrainInputs if isinstance(self.params, TrainParams) else GenerateInputs
        if not isinstance(self.inputs, expected):
            raise TypeError(f"a {self.kind} job needs {expected.__name__}, not {type(self.inputs).__name__}")

    @property
    def kind(self) -> JobKind:
        return "train" if isinstance(self.params, TrainParams) else "generate"

    @property
    def adapter_key(self) -> str | None:
        """The LoRA a picture request needs on its worker (None for trainings and plain pictures)."""
        return self.params.adapter_key if isinstance(self.params, GenerateParams) else None

    def without_lora(self) -> WorkItem:
        """This item for a worker that already holds the person's LoRA: the file stays behind."""
        if isinstance(self.inputs, GenerateInputs) and self.inputs.lora is not None:
            return replace(self, inputs=replace(self.inputs, lora=None))
        return self


@dataclass(frozen=True)
class Picture:
    """One picture as PNG bytes, with the seed that makes it again (and, for samples, its prompt), and
    the image checker's verdict (trainer.safety_checker): True flagged, False passed, None not checked."""

    png: bytes = field(repr=False)
    seed: int
    prompt: str = ""
    flagged: bool | None = None


@dataclass(frozen=True)
class TrainOutput:
    """A finished training: the LoRA (diffusers format, and kohya's for the web UIs when it could be
    made), its metadata, and sample pictures with prompts to try."""

    lora: bytes = field(repr=False)
    kohya: bytes | None = field(repr=False)
    metadata: dict[str, str]
    steps: int
    final_loss: float
    samples: list[Picture] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    kind: Literal["train"] = "train"


@dataclass(frozen=True)
class GenerateOutput:
    """A finished picture request."""

    images: list[Picture]
    kind: Literal["generate"] = "generate"


# Callers pass `type(x)`: a class is hashable, but mypy does not take type[X] for the cache's
# Hashable argument (python/mypy#17730), hence their `type: ignore[arg-type]`.
@cache
def _adapter(kind: type) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def to_stored(params: TrainParams | GenerateParams) -> dict[str, Any]:
    """A job's parameters as the JSON the database keeps."""
    return _adapter(type(params)).dump_python(params, mode="json")  # type: ignore[arg-type]  # python/mypy#17730


def from_stored(kind: str, stored: dict[str, Any]) -> TrainParams | GenerateParams:
    """Parameters stored by `to_stored` (or by an earlier version, which kept the same keys)."""
    return _adapter(TrainParams if kind == "train" else GenerateParams).validate_python(stored)
