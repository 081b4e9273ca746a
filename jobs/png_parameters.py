"""A picture's settings as the `parameters` text AUTOMATIC1111's web UI writes into its PNGs, and read back.

Every generated PNG carries this text (trainer.png writes the chunk), so the web UIs' "PNG Info" tab
and the sites that read it show how the picture was made, and the same settings make it again:

    a photo of zqjane woman, on a horse
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model: stable-diffusion-v1-5/stable-diffusion-v1-5, Lora hashes: "zqjane: 0123456789ab"

The layout is A1111's `create_infotext` (modules/processing.py, version 1.9 and later): the prompt,
a "Negative prompt:" line when there is one, then "Key: value" pairs in A1111's order, a value
quoted as JSON when it holds a comma, a colon or a line break. The parser follows A1111's
`parse_generation_parameters`, so what A1111 reads from our files this reads too.

Nothing goes in but the settings: the prompt as the model read it (what the person typed, with
their handle and style words added), the base model's name without any folder, and the LoRA's name
and hash. No Discord ids, user names or file paths.

Torch-free, so the bot can read a picture's settings back.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# The PNG text chunk's keyword that A1111 (and the readers of its files) use.
KEY = "parameters"

# What a flow-matching model (Flux) samples with, whatever the request named: its own Euler
# scheduler, as Forge names it for Flux. Forge also writes Flux's distilled guidance as "Distilled
# CFG Scale", with "CFG scale: 1" for the classifier-free guidance Flux does not use.
FLOW_SAMPLER = "flow_euler"
DISTILLED_GUIDANCE = "Distilled CFG Scale"

# Our schedulers (jobs.requests.SCHEDULER_NAMES, built by trainer.noise_schedulers) as A1111's
# sampler and schedule type; None: the sampler's own schedule, left out of the text (A1111's
# "Automatic").
SAMPLERS: dict[str, tuple[str, str | None]] = {
    "dpmpp_2m": ("DPM++ 2M", "Karras"),  # use_karras_sigmas=True
    "euler_a": ("Euler a", None),
    "euler": ("Euler", None),
    "ddim": ("DDIM", None),
    "unipc": ("UniPC", None),
    FLOW_SAMPLER: ("Euler", "Simple"),
}
AUTOMATIC_SCHEDULE = "Automatic"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# A1111's "Lora hashes" show the first 12 hex digits of a LoRA's hash.
LORA_HASH_DIGITS = 12

# A1111's own pattern for "Key: value" pairs (modules/infotext_utils.py `re_param_code`).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


class UnreadableParameters(ValueError):
    """Text that is not a picture's settings this project can make again; the message says why."""


@dataclass(frozen=True)
class PictureSettings:
    """How one picture was made. `scheduler` is one of jobs.requests.SCHEDULER_NAMES, or FLOW_SAMPLER
    for a flow-matching model (whose `guidance` is then its distilled guidance); `lora_name`
    and `lora_hash` are set for pictures made with a person's LoRA; `strength` for variations."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int
    model: str
    lora_name: str | None = None
    lora_hash: str | None = None
    strength: float | None = None


def _number(value: float) -> str:
    """7.0 as "7" (as A1111's pictures mostly show it), other numbers exactly (repr round-trips)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quote(value: str) -> str:
    """A1111's `quote`: JSON for a value a reader would otherwise split, as-is otherwise. Values that
    start with a quote or have outer spaces are quoted too, which A1111 reads back alike."""
    if any(c in value for c in ",:\n") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def to_text(settings: PictureSettings) -> str:
    """The `parameters` text A1111 would write for a picture made with `settings`."""
    sampler, schedule = SAMPLERS[settings.scheduler]
    distilled = settings.scheduler == FLOW_SAMPLER
    pairs: list[tuple[str, str | None]] = [
        ("Steps", str(settings.steps)),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", "1" if distilled else _number(settings.guidance)),
        (DISTILLED_GUIDANCE, _number(settings.guidance) if distilled else None),
        ("Seed", str(settings.seed)),
        ("Size", f"{settings.width}x{settings.height}"),
        ("Model", settings.model or None),
        ("Denoising strength", None if settings.strength is None else _number(settings.strength)),
        ("Lora hashes", None),
    ]
    if settings.lora_hash is not None:
        name = settings.lora_name or ""
        if not name or any(c in name for c in ",:"):  # A1111 splits the list at commas and each entry at its colon
            raise ValueError(f"a LoRA hash needs a name without ',' or ':' (A1111 splits there): {name!r}")
        pairs[-1] = ("Lora hashes", f"{name}: {settings.lora_hash}")
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs if value is not None)
    negative = f"\n{_NEGATIVE} {settings.negative_prompt}" if settings.negative_prompt else ""
    return f"{settings.prompt}{negative}\n{line}".strip()


def _pairs(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, the last line's pairs), split as A1111's parser splits them."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # not a settings line: part of the prompt
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), {k: _unquote(v) for k, v in _PAIR.findall(last)}


def _scheduler(sampler: str, schedule: str) -> str:
    if schedule == AUTOMATIC_SCHEDULE:
        # Before 1.9, A1111 named the schedule in the sampler: "DPM++ 2M Karras".
        for name, (ours, our_schedule) in SAMPLERS.items():
            if our_schedule is not None and sampler == f"{ours} {our_schedule}":
                return name
    for name, (ours, our_schedule) in SAMPLERS.items():
        if sampler == ours and schedule == (our_schedule or AUTOMATIC_SCHEDULE):
            return name
    raise UnreadableParameters(f"The sampler {sampler} ({schedule} schedule) is not one this bot has.")


def parse(text: str) -> PictureSettings:
    """The settings in a picture's `parameters` text; raises UnreadableParameters when they are missing
    or name what this project cannot make (another sampler, several LoRAs)."""
    prompt, negative, pairs = _pairs(text)
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in pairs]
    if missing:
        raise UnreadableParameters(f"These picture settings lack {', '.join(missing)}.")
    size = _SIZE.match(pairs["Size"])
    if size is None:
        raise UnreadableParameters(f"The size {pairs['Size']!r} is not WIDTHxHEIGHT.")
    lora_name = lora_hash = None
    if "Lora hashes" in pairs:
        entries = [entry.strip() for entry in pairs["Lora hashes"].split(",") if entry.strip()]
        if len(entries) != 1 or ":" not in entries[0]:
            raise UnreadableParameters("These picture settings do not name one LoRA as \"name: hash\"; "
                                       "this bot draws with one.")
        lora_name, _, lora_hash = (part.strip() for part in entries[0].partition(":"))
    try:
        return PictureSettings(
            prompt=prompt, negative_prompt=negative, seed=int(pairs["Seed"]), steps=int(pairs["Steps"]),
            guidance=float(pairs.get(DISTILLED_GUIDANCE, pairs["CFG scale"])),
            scheduler=_scheduler(pairs["Sampler"], pairs.get("Schedule type", AUTOMATIC_SCHEDULE)),
            width=int(size.group(1)), height=int(size.group(2)), model=pairs.get("Model", ""),
            lora_name=lora_name, lora_hash=lora_hash,
            strength=float(pairs["Denoising strength"]) if "Denoising strength" in pairs else None)
    except ValueError as exc:
        if isinstance(exc, UnreadableParameters):
            raise
        raise UnreadableParameters(f"These picture settings hold a number that is not one: {exc}") from exc


def model_name(spec: str) -> str:
    """The base model as pictures name it: a Hugging Face id as it is, a folder or single file by its
    own name (a file without its suffix, as A1111 names checkpoints), never the folders above it."""
    looks_like_path = (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
                       or spec.lower().endswith(SINGLE_FILE_SUFFIXES) or Path(spec).expanduser().exists())
    if not looks_like_path:
        return spec
    path = Path(spec.replace("\\", "/")).expanduser()
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    return name[: -len(path.suffix)] if path.suffix.lower() in SINGLE_FILE_SUFFIXES else name


def lora_hash(path: Path) -> str:
    """A LoRA file's hash as A1111 shows it in "Lora hashes": the first 12 hex digits of the SHA-256 of
    a safetensors file's tensor data, its JSON header left out (the "addnet" hash of kohya's
    sd-scripts and sd-webui-additional-networks), so editing the file's metadata does not change it."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_size)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:LORA_HASH_DIGITS]
