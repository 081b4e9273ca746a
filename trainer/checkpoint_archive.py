"""A training checkpoint (file or folder) as bytes, so it can travel to the bot and back."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.errors import BadCheckpoint


@dataclass(frozen=True)
class CheckpointSaved:
    """The trainer's event: a resumable checkpoint was written at `path` after `step` steps. A worker
    sends the bot its bytes instead (`jobs.events.Checkpoint`)."""

    step: int
    path: str
    type: Literal["checkpoint_saved"] = "checkpoint_saved"


def pack_path(path: Path) -> bytes:
    """A checkpoint (file or folder) as bytes, so it can travel to the bot and back."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(path).as_posix())
        else:
            archive.write(path, path.name)
    return buffer.getvalue()


def unpack_to(data: bytes, folder: Path) -> Path:
    """Undo `pack_path` into `folder`; returns the checkpoint path the trainer resumes from.
    A damaged or empty archive raises BadCheckpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            for name in names:
                target = (folder / name).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise ValueError("checkpoint archive escapes its folder")
            if not names:
                raise ValueError("empty checkpoint archive")
            archive.extractall(folder)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise BadCheckpoint(f"The stored checkpoint cannot be unpacked ({exc}).") from exc
    return folder / names[0] if len(names) == 1 else folder
