"""A GPU worker's start: how soon it takes its first job, and how soon it runs at compiled speed.

A worker takes jobs once its model is loaded and compiles generation and the training step in the
background (`trainer.worker.Worker.prepare`, trainer.background_compile); inductor keeps what it
compiled in an on-disk cache, and the worker packs it into one artifact (trainer.compile_artifacts),
so a new install's first start compiles for long and later ones read the code back. Each start here
runs in a fresh process, as a worker's does, with one cache folder per kind of compiled code under
`--cache-root`:

- `VARIANT:cold`: the variant's cache folder emptied first, as on a new install;
- `VARIANT:warm`: the folder kept from the starts before it, as on every restart;
- `VARIANT:artifact`: an empty cache but for the artifact the start before it kept, as on a new
  machine given what another worker published (Redis with Celery).

Variants: `default` (the worker's defaults: start helpers compile parts of the start in processes of
their own beside it, as many as fit, trainer.start_helpers), `serial` (`START_HELPERS=0`: the worker
compiles every part itself, one after the other) and `dynamic` (`COMPILE_STATIC_SHAPES=0`: generation
compiled for dynamic shapes only, another way to shorten a first start). `default` and `serial`
compile the same code, so they share a cache folder (`static`): `default:cold,serial:warm` compares
a restart without helpers with the one a helped first start leaves. `dynamic` has its own.

For each start it prints, in seconds from the process's start, when the worker took jobs (its model
loaded, the artifact unpacked), when each part was compiled by a start helper and switched to
(trainer.start_report), and when the compiled speed was reached (every part switched to), with the
ratio of the first start's time to each start's, and the time garbage collections paused it. A
start still running when the run's `--budget` seconds are spent is interrupted, and the parts it
finished are reported.

    python -m bench.worker_start                                       # sd15-random on CUDA: cold, then warm
    python -m bench.worker_start --starts default:cold,default:artifact  # a new machine given the artifact
    python -m bench.worker_start --starts dynamic:cold,dynamic:warm --no-training
    python -m bench.worker_start --model tiny --device cpu             # CPU smoke test: nothing compiles there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer import gc_pauses
from trainer.start_report import PartTime

VARIANTS = ("default", "serial", "dynamic")
# The cache folder of each variant, named for the code it holds: helpers change who compiles, not what.
CACHES = {"default": "static", "serial": "static", "dynamic": "dynamic"}
KINDS = ("cold", "warm", "artifact")


class Recorder:
    """Appends each part the worker reports as ended, and each long garbage collection, to a
    JSON-lines file as it happens, so a start interrupted by the budget still reports what it
    finished. The figures are the worker's own, unrounded: none is read back from its log."""

    def write(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0  # seconds from the process's start to the worker's report's

    def part(self, timed: PartTime) -> None:
        self.write({"part": timed.part, "seconds": timed.seconds, "at_s": self.offset + timed.at})

    def pause(self, seconds: float) -> None:
        self.write({"pause_s": seconds})


def start_one(variant: str, model: str, device: str, training: bool, record: Path) -> None:
    """One worker's start in this process, as `trainer.worker` runs it, its parts written to `record`.
    Timed from before torch is imported, as a worker process's start is."""
    started = time.monotonic()
    import torch

    from common.logs import setup_logging
    from jobs.worker_config import WorkerConfig
    from trainer.pipelines import pick_device
    from trainer.worker import Worker

    setup_logging("INFO")  # as the worker's process sets it up
    recorder = Recorder(record)
    # The timer the worker's start installs is this one (it installs one per process).
    gc_pauses.log_long_collections().on_long = recorder.pause
    device = pick_device(device)
    recorder.write({"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
                    "torch": torch.__version__})
    work = Path(tempfile.mkdtemp(prefix="worker-start-"))
    try:
        config = WorkerConfig(base_model=model, device=device, work_dir=str(work / "work"),
                              class_cache_dir=str(work / "classes"), compile_static_shapes=variant != "dynamic",
                              start_helpers=0 if variant == "serial" else -1, compile_training=training,
                              compile_cache_dir=os.environ["TORCHINDUCTOR_CACHE_DIR"])
        worker = Worker(config)
        recorder.offset = time.monotonic() - started
        worker.prepare(on_timed=recorder.part)
        recorder.write({"serving_s": time.monotonic() - started})
        worker.wait_compiled()
        recorder.write({"total_s": time.monotonic() - started})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_start(spec: str, args: argparse.Namespace, seconds_left: float) -> dict[str, Any]:
    """Run one start (`variant:kind`) in a child process, stopping it after `seconds_left`."""
    variant, kind = spec.split(":")
    cache = args.cache_root / CACHES[variant]
    if kind in ("cold", "artifact"):
        kept = args.cache_root / "kept-artifacts"
        shutil.rmtree(kept, ignore_errors=True)
        if kind == "artifact" and (cache / "artifacts").is_dir():
            shutil.copytree(cache / "artifacts", kept)
        shutil.rmtree(cache, ignore_errors=True)
        if kept.is_dir():
            shutil.copytree(kept, cache / "artifacts")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "parts.jsonl"
        record.touch()
        command = [sys.executable, "-m", "bench.worker_start", "--child", variant, "--record", str(record),
                   "--model", args.model, "--device", args.device, *(() if args.training else ("--no-training",))]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache.resolve())}
        started = time.monotonic()
        child = subprocess.Popen(command, env=env, start_new_session=True)
        returncode: int | None = None
        try:
            returncode = child.wait(timeout=None if seconds_left == float("inf") else max(seconds_left, 0.0))
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when this process is interrupted: the start runs in a session of its own
            if returncode is None:
                stop(child)
        elapsed = time.monotonic() - started
        entries = [json.loads(line) for line in record.read_text().splitlines()]
    ended = next((e for e in entries if "total_s" in e), None)
    serving = next((e["serving_s"] for e in entries if "serving_s" in e), None)
    known = next((e for e in entries if "device" in e), {"device": "unknown", "torch": "unknown"})
    return {"start": spec, "finished": ended is not None, "returncode": returncode,
            "first_job_accepted_s": serving, "seconds": ended["total_s"] if ended else elapsed,
            "parts": [{"part": e["part"], "seconds": e["seconds"], "at_s": e["at_s"]} for e in entries if "part" in e],
            "pauses": len([e for e in entries if "pause_s" in e]),
            "paused_s": sum(e["pause_s"] for e in entries if "pause_s" in e),
            "device": known["device"], "torch": known["torch"]}


def stop(child: subprocess.Popen[bytes]) -> None:
    """Stop a start and inductor's compile workers in its session; kill them if they linger.

    SIGTERM, not SIGINT: a shell's background jobs inherit SIGINT ignored, and so would the start."""
    os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def report(results: list[dict[str, Any]]) -> None:
    first = results[0]
    print(f"device={first['device']} torch={first['torch']} starts={','.join(r['start'] for r in results)}",
          flush=True)
    for result in results:
        what = ("" if result["finished"] else
                "  (interrupted: the budget ran out; the parts it finished)" if result["returncode"] is None else
                f"  (failed with exit code {result['returncode']}; the parts it finished)")
        print(f"{result['start']}{what}")
        print(f"  {'':<52} {'took':>9} {'ended at':>10}")
        for part in result["parts"]:
            print(f"  {part['part']:<52} {part['seconds']:7.1f} s {part['at_s']:8.1f} s")
        serving = result["first_job_accepted_s"]
        print(f"  {'first job accepted at':<62} " + ("   never" if serving is None else f"{serving:8.1f} s"))
        total = f"{result['seconds']:8.1f} s" if result["finished"] else f"> {result['seconds']:6.1f} s"
        ratio = (f"{first['seconds'] / result['seconds']:.2f}x the first start's speed"
                 if first["finished"] and result["finished"] else "no ratio (a start did not finish)")
        print(f"  {'compiled speed reached at':<62} {total}  {ratio}")
        print(f"  garbage collections over {gc_pauses.LONG_COLLECTION_S} s: {result['pauses']}, "
              f"{result['paused_s']:.1f} s in all", flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="sd15-random, tiny, a hub id or a folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--starts", default="default:cold,default:warm",
                        help=f"comma-separated VARIANT:KIND, run in order; variants {VARIANTS}, kinds {KINDS}")
    parser.add_argument("--no-training", dest="training", action="store_false",
                        help="leave out compiling the training step (the same for every variant)")
    parser.add_argument("--cache-root", type=Path, help="the inductor cache folders of the variants here (default: a new temporary folder)")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for all the starts together")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        start_one(args.child, args.model, args.device, args.training, args.record)
        return []
    starts = args.starts.split(",")
    for spec in starts:
        variant, _, kind = spec.partition(":")
        if variant not in VARIANTS or kind not in KINDS:
            parser.error(f"a start is VARIANT:KIND with a variant of {VARIANTS} and a kind of {KINDS}, not {spec!r}")
    with tempfile.TemporaryDirectory() as default_root:
        args.cache_root = args.cache_root or Path(default_root)
        deadline = time.monotonic() + args.budget
        results = []
        for spec in starts:
            results.append(run_start(spec, args, deadline - time.monotonic()))
            if not results[-1]["finished"]:
                break
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
