"""Compiled code kept and shared as one artifact (trainer.compile_artifacts): what is refused, where it
is kept, a real round trip through inductor's cache, and a worker that keeps it and loads it again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.worker_config import WorkerConfig
from tests.work_items import JOB_SECRET
from trainer import compile_artifacts
from trainer.compile_artifacts import FolderStore, Manifest, RedisStore, artifact_name, manifest_for, refusal
from trainer.start_report import ARTIFACTS, MODEL
from trainer.worker import Worker

SECRET = JOB_SECRET.encode()
KEY = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "model": "sd15-random", "parts": "training"}
BLOB = bytes(range(256)) * 64


def test_a_blob_is_refused_when_stale_tampered_or_unsigned_and_taken_when_it_matches() -> None:
    signed = manifest_for(KEY, BLOB, SECRET)
    assert refusal(signed, BLOB, KEY, SECRET) is None
    assert Manifest.from_bytes(signed.to_bytes()) == signed
    newer_torch = {**KEY, "torch": "2.14.0"}
    assert refusal(signed, BLOB, newer_torch, SECRET) == "stale: made for another torch"
    other_gpu = {**KEY, "device": "NVIDIA H200"}
    assert refusal(manifest_for(other_gpu, BLOB, SECRET), BLOB, KEY, SECRET) == "stale: made for another device"
    flipped = bytes([BLOB[0] ^ 1]) + BLOB[1:]
    assert refusal(signed, flipped, KEY, SECRET).startswith("tampered")
    assert refusal(signed, BLOB[:-1], KEY, SECRET).startswith("tampered")
    # Whoever rewrites the blob and its hash cannot sign them without the secret.
    rehashed = manifest_for(KEY, flipped, b"another secret of at least thirty-two characters")
    assert refusal(rehashed, flipped, KEY, SECRET) == "not signed with this JOB_SECRET"
    assert refusal(manifest_for(KEY, flipped, None), flipped, KEY, SECRET) == "not signed with this JOB_SECRET"
    assert refusal(manifest_for(KEY, BLOB, None), BLOB, KEY, None) is None  # a worker's own folder, no secret


def test_names_differ_per_key_and_a_folder_keeps_blobs_whole(tmp_path: Path) -> None:
    assert artifact_name(KEY) != artifact_name({**KEY, "torch": "2.14.0"})
    assert artifact_name(KEY) == artifact_name(dict(reversed(list(KEY.items()))))
    store = FolderStore(tmp_path / "artifacts")
    assert store.get("x") is None and not store.has("x")
    store.put("x", b"manifest", BLOB)
    assert store.has("x") and store.get("x") == (b"manifest", BLOB)
    assert not list(store.folder.glob("*.partial"))
    store.remove("x")
    assert store.get("x") is None and not list(store.folder.iterdir())


def test_redis_keeps_a_blob_in_chunks(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    monkeypatch.setattr(compile_artifacts, "CHUNK_BYTES", 5000)
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client)
    assert store.get("x") is None and not store.has("x")
    store.put("x", b"manifest", BLOB)
    assert client.llen(f"{store.prefix}:x:chunks") == 4  # 16 KiB in chunks of 5000 bytes
    assert store.has("x") and store.get("x") == (b"manifest", BLOB)
    store.put("x", b"manifest 2", BLOB[:10])  # a new blob replaces the old one whole
    assert store.get("x") == (b"manifest 2", BLOB[:10])
    store.remove("x")
    assert store.get("x") is None and not client.keys(f"{store.prefix}:*")


@pytest.fixture()
def unpacked(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The blobs this process would have unpacked into its compile cache."""
    blobs: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", blobs.append)
    return blobs


def test_load_takes_the_first_good_blob_and_removes_refused_ones(
        tmp_path: Path, unpacked: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    name = artifact_name(KEY)
    tampered, stale, good = (FolderStore(tmp_path / n) for n in ("tampered", "stale", "good"))
    tampered.put(name, manifest_for(KEY, BLOB, SECRET).to_bytes(), BLOB[:100] + b"!" + BLOB[101:])
    stale.put(name, manifest_for({**KEY, "torch": "2.12.0"}, BLOB, SECRET).to_bytes(), BLOB)
    good.put(name, manifest_for(KEY, BLOB, SECRET).to_bytes(), BLOB)
    empty = FolderStore(tmp_path / "empty")
    with caplog.at_level(logging.WARNING, logger="trainer.compile_artifacts"):
        assert compile_artifacts.load([empty, tampered, stale, good], KEY, SECRET) is good
    assert unpacked == [BLOB]
    assert not tampered.has(name) and not stale.has(name) and good.has(name)
    assert "tampered or damaged" in caplog.text and "stale: made for another torch" in caplog.text
    garbled = FolderStore(tmp_path / "garbled")
    garbled.put(name, b"{not json", BLOB)
    with pytest.raises(json.JSONDecodeError):
        Manifest.from_bytes(b"{not json")
    assert compile_artifacts.load([garbled], KEY, SECRET) is None and not garbled.has(name)
    assert unpacked == [BLOB]


def test_save_writes_only_where_the_blob_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (BLOB, None))
    kept, missing = FolderStore(tmp_path / "kept"), FolderStore(tmp_path / "missing")
    kept.put(artifact_name(KEY), b"an older manifest", b"an older blob")
    assert compile_artifacts.save([kept, missing], KEY, SECRET)
    assert kept.get(artifact_name(KEY)) == (b"an older manifest", b"an older blob")
    manifest, blob = missing.get(artifact_name(KEY))
    assert blob == BLOB and refusal(Manifest.from_bytes(manifest), blob, KEY, SECRET) is None
    assert not compile_artifacts.save([kept, missing], KEY, SECRET)  # nowhere lacks it
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert not compile_artifacts.save([FolderStore(tmp_path / "third")], KEY, SECRET)  # nothing compiled


@pytest.mark.slow
def test_a_worker_keeps_its_compiled_code_and_the_next_one_loads_it_before_compiling(
        tmp_path: Path, unpacked: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with the "eager" backend the worker compiles its parts itself; what it packs is
    stood in for (inductor's blob needs inductor's compiling)."""
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (BLOB, None))
    shared = FolderStore(tmp_path / "shared")  # as Redis is with Celery

    def worker(name: str) -> Worker:
        config = WorkerConfig("tiny", "cpu", str(tmp_path / name), str(tmp_path / "classes"), compile_backend="eager",
                              compile_cache_dir=str(tmp_path / f"{name}-cache"), compile_generation=False)
        return Worker(config, shared_artifacts=shared, secret=SECRET)

    first = worker("first")
    report = first.prepare()
    assert first.wait_compiled(timeout=300)
    assert unpacked == [] and report.names() == [MODEL, ARTIFACTS, "training"]  # nothing to load yet
    name = first_name = next(p.stem for p in shared.folder.glob("*.json"))
    assert (tmp_path / "first-cache" / "artifacts" / f"{first_name}.bin").read_bytes() == BLOB

    second = worker("second")  # another machine: an empty cache folder, the shared store
    second.prepare()
    assert unpacked == [BLOB]  # loaded as it started, before any part compiled
    assert second.wait_compiled(timeout=300)
    assert (tmp_path / "second-cache" / "artifacts" / f"{name}.bin").read_bytes() == BLOB

    other_model = Worker(WorkerConfig("tiny-sdxl", "cpu", str(tmp_path / "third"), str(tmp_path / "classes"),
                                      compile_backend="eager", compile_generation=False),
                         shared_artifacts=shared, secret=SECRET)
    other_model.prepare()
    assert other_model.wait_compiled(timeout=300)
    assert unpacked == [BLOB]  # another key: nothing of the others' is loaded
    assert len(list(shared.folder.glob("*.json"))) == 2
    for done in (first, second, other_model):
        done.stop_compiling()


@pytest.mark.slow
def test_a_new_process_reads_what_another_compiled_from_the_artifact_instead_of_compiling(tmp_path: Path) -> None:
    """Inductor on the CPU, each process with a cache folder of its own: the second one finds the
    first one's blob (after refusing a tampered copy) and its compile hits the cache."""

    def run(mode: str, cache: str, *folders: Path) -> dict[str, Any]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache)}
        done = subprocess.run([sys.executable, "-m", "tests.trainer.artifact_process", mode, *map(str, folders)],
                              env=env, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    saved = run("save", "first-cache", tmp_path / "kept")
    assert saved["counters"].get("fxgraph_cache_miss", 0) >= 1
    name = next((tmp_path / "kept").glob("*.json")).stem
    tampered = FolderStore(tmp_path / "tampered")
    manifest, blob = FolderStore(tmp_path / "kept").get(name)
    tampered.put(name, manifest, blob[:-1] + bytes([blob[-1] ^ 1]))
    loaded = run("load", "second-cache", tmp_path / "tampered", tmp_path / "kept")
    assert loaded["loaded_from"] == str(tmp_path / "kept") and not tampered.has(name)
    assert loaded["counters"].get("fxgraph_cache_hit", 0) >= 1
    assert loaded["counters"].get("fxgraph_cache_miss", 0) == 0
