"""Why a part of a worker's start misses inductor's compile cache: the training step compiled alone
(as a start helper compiles it) against the same step compiled after a generation warm-up part (as
the worker compiles it), sharing one cache.

Two processes start at once on an empty cache: `alone` compiles the training step; `after` runs the
engine's warm-up part `--before` and then, once `alone` has finished, the training step, which
should then read `alone`'s code back. Each process logs the cache keys of the graphs it compiles,
with what went into each key (inductor's and AOTAutograd's debug lines). The report gives each
process's time for the step, its cache hits and misses, and the components (settings, inputs, the
graph...) in which `after`'s keys differ from `alone`'s. It found that trainer.fused_linears' pass,
pickled into every key with the counts it kept, made each of the step's keys differ.

    python -m bench.cache_keys --out cache-keys          # sd15-random on CUDA
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CACHE_LOGGERS = ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")
DETAILS = re.compile(r"hash details for key (?P<key>\S+):")
COMPONENT = re.compile(r"^\[(?P<hash>\w+)\] (?P<name>[^:]+):")
TRAINING_BEGINS = "==== the training step begins"


def child(role: str, out: Path, model: str, before: str) -> None:
    """One process: `alone` compiles the training step; `after` runs the part `before` first."""
    from common.logs import setup_logging
    from jobs.worker_config import WorkerConfig
    from trainer.worker import Worker

    setup_logging("INFO")
    keys = logging.FileHandler(out / f"{role}.keys.log")
    keys.setLevel(logging.DEBUG)
    for name in CACHE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(keys)
    import torch

    work = Path(tempfile.mkdtemp(prefix=f"cache-keys-{role}-"))
    worker = Worker(WorkerConfig(model, "cuda", str(work / "work"), str(work / "classes"), start_helpers=0))
    times: dict[str, float] = {}
    if role == "after":
        started = time.monotonic()
        worker.compile_part(before)
        times[before] = time.monotonic() - started
        while not (out / "alone.json").exists():
            time.sleep(1)
    keys.stream.write(f"{TRAINING_BEGINS}\n")
    started = time.monotonic()
    counters_before = json.loads(json.dumps(torch._dynamo.utils.counters, default=dict))
    worker.compile_part("training")
    times["training"] = time.monotonic() - started
    counters = json.loads(json.dumps(torch._dynamo.utils.counters, default=dict))
    (out / f"{role}.json").write_text(json.dumps({"times": times, "counters": counters,
                                                  "counters_before_training": counters_before}, indent=1))


def blocks(path: Path, training_only: bool) -> dict[str, dict[str, str]]:
    """Each key's components (name -> "[hash] value", a value may span lines) in a process's log,
    only those written after the training step began if `training_only`."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if training_only:
        text = text.partition(TRAINING_BEGINS)[2]
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    name = ""
    for line in text.splitlines():
        if match := DETAILS.search(line):
            current = found.setdefault(match["key"], {})
        elif current is not None and (part := COMPONENT.match(line)):
            name = part["name"]
            current[name] = current.get(name, "") + line
        elif current is not None and name in current:
            current[name] += "\n" + line
    return found


def compare(out: Path) -> list[str]:
    """The report's lines: times, cache counters, and, where `after`'s step missed `alone`'s keys, in
    which components they differ."""
    lines = []
    for role in ("alone", "after"):
        path = out / f"{role}.json"
        if not path.exists():
            lines.append(f"{role}: did not finish")
            continue
        result = json.loads(path.read_text())
        cache = {k: v for group in ("inductor", "aot_autograd") for k, v in result["counters"].get(group, {}).items()
                 if "cache" in k}
        lines.append(f"{role}: seconds {json.dumps(result['times'])}; cache counters at the end {json.dumps(cache)}")
    alone = blocks(out / "alone.keys.log", training_only=False)
    after = blocks(out / "after.keys.log", training_only=True)
    missing = [key for key in after if key not in alone]
    lines.append(f"keys: alone {len(alone)}, after's training step {len(after)}, of which alone has not "
                 f"{len(missing)}")
    differing: collections.Counter[str] = collections.Counter()
    example: dict[str, tuple[str, str]] = {}
    # Keys paired in the order they were computed: `after`'s missing keys with `alone`'s, when any.
    pairs = zip((after[k] for k in missing), (alone[k] for k in alone), strict=False) if missing else ()
    for mine, theirs in pairs:
        for name in set(mine) | set(theirs):
            if mine.get(name, "").partition("]")[0] != theirs.get(name, "").partition("]")[0]:  # its hash
                differing[name] += 1
                example.setdefault(name, (mine.get(name, ""), theirs.get(name, "")))
    for name, count in differing.most_common():
        lines.append(f"component {name}: differs in {count} key pair(s)")
        lines += [f"   after: {example[name][0][:300]}", f"   alone: {example[name][1][:300]}"]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--before", default="square-1", help="the warm-up part `after` runs first")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for both processes")
    parser.add_argument("--child", choices=("alone", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.out, args.model, args.before)
        return
    cache = Path(tempfile.mkdtemp(prefix="cache-keys-inductor-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    processes: list[subprocess.Popen[Any]] = []
    for role in ("alone", "after"):
        with (args.out / f"{role}.log").open("w") as log_file:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "bench.cache_keys", "--child", role, "--out", str(args.out),
                 "--model", args.model, "--before", args.before], env=env, stdout=log_file, stderr=log_file))
    deadline = time.monotonic() + args.budget
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    report = compare(args.out)
    (args.out / "report.txt").write_text("\n".join(report) + "\n")
    sys.stdout.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
