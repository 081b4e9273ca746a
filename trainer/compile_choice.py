"""Whether `python -m trainer train` and `imagine` compile: only when asked, or when it pays back in the job.

On a GPU, compiled code makes every training step and every picture a few milliseconds faster than
the CUDA graphs of plain stages, but compiling costs minutes with a cold inductor cache and seconds
with a warm one. A worker compiles once and serves for weeks; one command run may take 16 s. So the
command line compiles only when the milliseconds it saves in this job add up to more than the
compiling it costs, or when `--compile`/`--no-compile` says. `decide` is that rule, free of torch.

"Warm" here means: a compiled run of the same kind, with the settings that make compiled code
reusable, finished on this machine before, with inductor's cache in the same folder (a marker file
that run left there). That is a good sign, not a proof: a cache emptied by hand still looks warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from common.atomic import atomic_write

log = logging.getLogger(__name__)

MARKERS = "finished-runs"  # inside the compile cache folder


@dataclass(frozen=True)
class CompileCosts:
    """What compiling is worth for one kind of job. These are the decision's inputs; the measurements
    they come from live in bench/RESULTS.md (each constant below names its section)."""

    unit: str  # what the job's amount of work counts, e.g. "training steps"
    saved_per_unit_s: float  # seconds one unit saves, compiled against graphs of plain stages
    cold_s: float  # seconds compiling adds with a cold inductor cache
    warm_s: float  # seconds reading compiled code back from a warm cache adds


# bench/RESULTS.md, "the training step compiled for static shapes, with fused projections" (H200,
# SD 1.5 shapes, 512 px): plain graphed stages 28.1 / 20.1 ms a step against 21.53 / 15.03 ms compiled
# (prior preservation / none); compiling cold 134.2 / 166.3 s and warm 14.8 s, the first step's graph
# capture included, less the 8.2 s that capturing plain stages takes too ("Earlier on 2026-11-30
# (evening)", training step).
TRAINING_WITH_PRIOR = CompileCosts("training steps", saved_per_unit_s=0.00657, cold_s=126.0, warm_s=6.6)
TRAINING_WITHOUT_PRIOR = CompileCosts("training steps", saved_per_unit_s=0.00507, cold_s=158.1, warm_s=6.6)
# bench/RESULTS.md: four 25-step pictures take 841.2 ms from graphs of plain blocks ("generation from
# compiled blocks") and 577.1 ms from compiled stages ("static shapes end to end"), 2.64 ms per
# picture-step; a first picture compiles its UNet stages and decoder in 180.7 + 76.2 s cold and
# 45.4 + 19.7 s warm ("the GPU tests on the code of 2026-12-02"), less 0.74 s of capturing plain ones.
GENERATION = CompileCosts("picture-steps", saved_per_unit_s=0.00264, cold_s=256.2, warm_s=64.4)


def training_costs(prior_preservation: bool) -> CompileCosts:
    return TRAINING_WITH_PRIOR if prior_preservation else TRAINING_WITHOUT_PRIOR


def decide(device_type: str, override: bool | None, warm: bool, units: int, costs: CompileCosts,
           graphed: bool = True) -> tuple[bool, str]:
    """Whether to compile, and why, in words for the person running the command.

    `override` is `--compile` (True) or `--no-compile` (False), None to decide; `units` is the job's
    work in `costs.unit`; `graphed` whether the work replays CUDA graphs (the figures are for that)."""
    if override is not None:
        return override, f"{'compiling' if override else 'not compiling'}: " \
                         f"--{'' if override else 'no-'}compile asked for it"
    if device_type != "cuda" or not graphed:
        where = device_type if device_type != "cuda" else "this run, which replays no CUDA graphs"
        return False, f"not compiling: compiled code pays only with CUDA graphs on a GPU, not on {where}; " \
                      "--compile to compile anyway"
    saved = units * costs.saved_per_unit_s
    cost = costs.warm_s if warm else costs.cold_s
    state = "warm" if warm else "cold"
    what = "reading compiled code back" if warm else "compiling"
    if saved > cost:
        return True, f"compiling: the compiled cache is {state} and {units} {costs.unit} would save " \
                     f"~{saved:.0f} s against ~{cost:.0f} s of {what}; --no-compile to skip it"
    return False, f"not compiling: the compiled cache is {state} and {units} {costs.unit} would save " \
                  f"~{saved:.0f} s against ~{cost:.0f} s of {what}; --compile to compile anyway"


def installed_versions() -> dict[str, str]:
    """The versions compiled code depends on (read without importing them)."""
    return {name: metadata.version(name) for name in ("torch", "diffusers")}


def run_key(kind: str, gpu: str, settings: Mapping[str, object],
            versions: Mapping[str, str] | None = None) -> dict[str, str]:
    """What makes a finished compiled run's code reusable by another: its kind ("train", "imagine"), the
    GPU, the library versions and the settings that fix the compiled shapes (model, rank, size...)."""
    return {"kind": kind, "gpu": gpu, **(installed_versions() if versions is None else versions),
            **{name: str(value) for name, value in settings.items()}}


def marker_path(cache_dir: Path, key: Mapping[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / MARKERS / f"{key['kind']}-{digest}.json"


def is_warm(cache_dir: Path, key: Mapping[str, str]) -> bool:
    """Whether a compiled run with this key finished here before; another GPU or version is cold."""
    return marker_path(cache_dir, key).is_file()


def mark_warm(cache_dir: Path, key: Mapping[str, str]) -> None:
    """Record that a compiled run with this key finished, so the next one counts the cache as warm."""
    path = marker_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(dict(key), sort_keys=True, indent=1).encode())


@dataclass(frozen=True)
class Choice:
    """The command line's decision for one run, and what to record when its compiled run finishes."""

    compile: bool
    reason: str
    cache_dir: Path
    key: dict[str, str]

    def finished(self) -> None:
        """Call once the run's work is done: a compiled run leaves its marker."""
        if self.compile:
            mark_warm(self.cache_dir, self.key)


def choose(kind: str, device: str, override: bool | None, compile_cache: Path, settings: Mapping[str, object],
           units: int, costs: CompileCosts, graphed: bool) -> Choice:
    """Decide, log the choice and why, and when compiling point inductor's cache at `compile_cache` (an
    operator's own TORCHINDUCTOR_CACHE_DIR wins, and the markers then go with it)."""
    cache_dir = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or compile_cache)
    device_type = device.split(":", 1)[0]
    gpu = device_type
    if device_type == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    key = run_key(kind, gpu, settings)
    compile, reason = decide(device_type, override, is_warm(cache_dir, key), units, costs, graphed)
    log.info("%s", reason)
    if compile:  # read by inductor when it first compiles, later in this process
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    return Choice(compile, reason, cache_dir, key)
