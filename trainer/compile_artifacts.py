"""Compiled code as one portable artifact, so that a restart or a new machine reads it instead of compiling.

Inductor keeps what it compiles in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`), but a new machine
has an empty one, and a restarted container may too. PyTorch packs what a process compiled, or read
from that cache, into one blob (`torch.compiler.save_cache_artifacts`, the "mega-cache": inductor's
compiled graphs, AOT autograd's, autotuning results) that another process unpacks into its own cache
(`torch.compiler.load_cache_artifacts`); its compiles then hit the cache instead of compiling.

A worker saves the blob once all its parts are compiled (trainer.background_compile) and loads it as
it starts, before anything compiles. Each blob is kept with a manifest of what it was compiled for
(`artifact_key`: GPU, torch, diffusers and Triton versions, the model and the settings that shape
the compiled code): one made for anything else is stale and never loaded. The manifest holds the
blob's SHA-256 and, where a secret is set (`JOB_SECRET` with Celery), an HMAC of both: the blob is
unpickled code, so with a secret nothing unsigned is ever loaded, and a blob that does not match its
manifest is refused. Refused blobs are removed; the worker then compiles as if there were none.

Where it is kept (`Store`): in the worker's compile cache folder (`FolderStore`), and with
`JOB_BACKEND=celery` also in Redis (`RedisStore`, in chunks), where a worker on another machine
fetches what the first one published.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from jobs.worker_config import WorkerConfig

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Redis values stay well under its limits and a transfer moves in steps a slow link survives.
CHUNK_BYTES = 8 * 1024 * 1024


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def artifact_key(config: WorkerConfig, device: str, parts: list[str]) -> dict[str, str]:
    """What compiled code depends on, for a worker with `config` on `device` compiling `parts`."""
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    return {
        "device": gpu, "torch": torch.__version__, "diffusers": _version("diffusers"), "triton": _version("triton"),
        "python": platform.python_version(), "model": config.base_model, "backend": config.compile_backend,
        "static_shapes": str(config.compile_static_shapes), "train_rank": str(config.train_rank),
        "parts": ",".join(parts),
    }


def artifact_name(key: dict[str, str]) -> str:
    """The name a key's blob is kept under: no two keys share one."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Manifest:
    """What a blob was compiled for, its hash and, with a secret, its signature."""

    key: dict[str, str]
    sha256: str
    size: int
    signature: str = ""
    version: int = MANIFEST_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        fields = json.loads(data)
        if not isinstance(fields, dict) or not isinstance(fields.get("key"), dict):
            raise ValueError("not a manifest")
        return cls(key={str(k): str(v) for k, v in fields["key"].items()}, sha256=str(fields["sha256"]),
                   size=int(fields["size"]), signature=str(fields.get("signature", "")),
                   version=int(fields.get("version", 0)))


def _signature(secret: bytes, key: dict[str, str], digest: str) -> str:
    message = json.dumps({"key": key, "sha256": digest}, sort_keys=True).encode()
    return hmac.new(secret, b"compile-artifact\n" + message, hashlib.sha256).hexdigest()


def manifest_for(key: dict[str, str], blob: bytes, secret: bytes | None) -> Manifest:
    digest = hashlib.sha256(blob).hexdigest()
    return Manifest(key, digest, len(blob), _signature(secret, key, digest) if secret else "")


def refusal(manifest: Manifest, blob: bytes, key: dict[str, str], secret: bytes | None) -> str | None:
    """Why the blob must not be loaded by a worker whose key is `key`, or None if it may be."""
    if manifest.version != MANIFEST_VERSION or manifest.key != key:
        stale = sorted(k for k in key.keys() | manifest.key.keys() if key.get(k) != manifest.key.get(k))
        return f"stale: made for another {', '.join(stale) or 'manifest version'}"
    if len(blob) != manifest.size or not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), manifest.sha256):
        return "tampered or damaged: its content does not match its manifest"
    if secret is not None and not hmac.compare_digest(_signature(secret, key, manifest.sha256), manifest.signature):
        return "not signed with this JOB_SECRET"
    return None


class Store(Protocol):
    """Somewhere blobs are kept by name."""

    where: str

    def get(self, name: str) -> tuple[bytes, bytes] | None:
        """The manifest's bytes and the blob, or None if there is none."""

    def has(self, name: str) -> bool:
        """Whether a blob of that name is kept here (without reading it)."""

    def put(self, name: str, manifest: bytes, blob: bytes) -> None: ...

    def remove(self, name: str) -> None: ...


class FolderStore:
    """Blobs as files in a folder (the worker's compile cache's `artifacts/`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where = "the compile cache folder"

    def get(self, name: str) -> tuple[bytes, bytes] | None:
        try:
            return (self.folder / f"{name}.json").read_bytes(), (self.folder / f"{name}.bin").read_bytes()
        except FileNotFoundError:
            return None

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.json").exists()

    def put(self, name: str, manifest: bytes, blob: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # The blob first, each file whole (temp file + rename): a manifest never names a half-written blob.
        for suffix, data in ((".bin", blob), (".json", manifest)):
            partial = self.folder / f"{name}{suffix}.partial"
            partial.write_bytes(data)
            partial.replace(self.folder / f"{name}{suffix}")

    def remove(self, name: str) -> None:
        for suffix in (".json", ".bin"):
            (self.folder / f"{name}{suffix}").unlink(missing_ok=True)


class RedisStore:
    """Blobs in Redis, in chunks, where the Celery workers of one bot share them."""

    def __init__(self, client: Any, prefix: str = "avatarbot:compile-artifacts") -> None:
        self.client, self.prefix = client, prefix
        self.where = "Redis"

    def _keys(self, name: str) -> tuple[str, str]:
        return f"{self.prefix}:{name}:manifest", f"{self.prefix}:{name}:chunks"

    def get(self, name: str) -> tuple[bytes, bytes] | None:
        manifest_key, chunks_key = self._keys(name)
        manifest = self.client.get(manifest_key)
        if manifest is None:
            return None
        return manifest, b"".join(self.client.lrange(chunks_key, 0, -1))

    def has(self, name: str) -> bool:
        return bool(self.client.exists(self._keys(name)[0]))

    def put(self, name: str, manifest: bytes, blob: bytes) -> None:
        manifest_key, chunks_key = self._keys(name)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(manifest_key, chunks_key)
        for start in range(0, len(blob), CHUNK_BYTES):
            pipe.rpush(chunks_key, blob[start:start + CHUNK_BYTES])
        pipe.set(manifest_key, manifest)
        pipe.execute()

    def remove(self, name: str) -> None:
        self.client.delete(*self._keys(name))


def load(stores: list[Store], key: dict[str, str], secret: bytes | None) -> Store | None:
    """Unpack the first good blob for `key` found in `stores` into this process's compile cache; the
    store it came from, or None. A refused blob is removed from its store, and said why in the log."""
    import torch

    name = artifact_name(key)
    for store in stores:
        try:
            found = store.get(name)
        except Exception as exc:  # noqa: BLE001 - a store out of reach is a store without the blob
            log.warning("could not read compiled code from %s: %s", store.where, exc)
            continue
        if found is None:
            continue
        try:
            manifest = Manifest.from_bytes(found[0])
            why = refusal(manifest, found[1], key, secret)
        except (ValueError, KeyError, TypeError) as exc:
            why = f"its manifest cannot be read ({exc})"
        if why is not None:
            log.warning("refused the compiled code in %s (%s); it is removed and compiled again", store.where, why)
            store.remove(name)
            continue
        torch.compiler.load_cache_artifacts(found[1])
        log.info("loaded compiled code from %s (%.1f MB)", store.where, len(found[1]) / 1e6)
        return store
    return None


def _has(store: Store, name: str) -> bool:
    try:
        return store.has(name)
    except Exception as exc:  # noqa: BLE001 - then it is written again, which costs only time
        log.warning("could not look for compiled code in %s: %s", store.where, exc)
        return False


def save(stores: list[Store], key: dict[str, str], secret: bytes | None) -> bool:
    """Pack what this process compiled or read from the cache into a blob for `key` in each of
    `stores` that lacks one; False if there was nothing to pack or nowhere lacked it."""
    import torch

    stores = [store for store in stores if not _has(store, artifact_name(key))]
    if not stores:
        return False
    packed = torch.compiler.save_cache_artifacts()
    if packed is None or not packed[0]:
        return False
    blob = packed[0]
    manifest = manifest_for(key, blob, secret).to_bytes()
    for store in stores:
        try:
            store.put(artifact_name(key), manifest, blob)
        except Exception as exc:  # noqa: BLE001 - the next start compiles, as it would without
            log.warning("could not keep the compiled code in %s: %s", store.where, exc)
        else:
            log.info("kept the compiled code in %s (%.1f MB)", store.where, len(blob) / 1e6)
    return True
