"""Settings from the environment and a `.env` file, validated once at start.

Every problem is reported on one line that names the variable and says what to fix, and all of
them are reported together, so that a person fixes their configuration in one pass.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from common.envfile import env_file_values, parse_switch
from jobs.requests import DEFAULT_BASE_MODEL, TRAIN_DEFAULTS, TrainConfig
from jobs.signing import DEFAULT_MAX_MESSAGE_MB, MB, secret_problem
from jobs.train_defaults import left_to_family
from jobs.worker_config import QUANTIZE_MODES, SAFETY_MODES
from storage.limits_db import Limits

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_BACKENDS = ("local", "celery")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_ID_LISTS = ("allowed_guilds", "admin_user_ids")
_NAME_LISTS = ("allowed_roles",)
_PATHS = ("data_dir", "heartbeat_file", "blocked_words_file")
# Base models known to be Stable Diffusion without loading them, which QUANTIZE refuses at start (any
# other base is checked by the worker once loaded: a folder or file may hold either family).
SD_BASES = frozenset({DEFAULT_BASE_MODEL, "stabilityai/stable-diffusion-xl-base-1.0", "tiny", "tiny-sdxl",
                      "sd15-random", "sdxl-random"})

DEFAULT_CONSENT_TEXT = (
    "Before I keep any photo: please confirm that **the photos you send are of you**, and that you "
    "agree that I train a model of your face from them, which only you can use. You can delete "
    "your photos, model and pictures at any time with `/forget`.")


class ConfigError(Exception):
    """One or more settings are wrong; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """What an operator can set. README.md documents each field under its variable name."""

    discord_token: str = field(default="", repr=False)
    data_dir: Path = Path("data")
    base_model: str = DEFAULT_BASE_MODEL
    device: str = "auto"
    quantize: str = "none"  # "int8": a Flux base's transformer weights in int8, for 24 GB GPUs (trainer.quantization)
    workers: int = 0  # 0: one worker per visible GPU, or one CPU worker when there is none
    job_backend: str = "local"
    redis_url: str = "redis://localhost:6379/0"  # JOB_BACKEND=celery: the broker the workers share
    job_secret: str = field(default="", repr=False)  # JOB_BACKEND=celery: signs jobs and events (jobs.signing)
    max_job_message_mb: int = DEFAULT_MAX_MESSAGE_MB  # JOB_BACKEND=celery: larger messages are dropped unread
    log_level: str = "INFO"
    dev_guild_id: int | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    max_photos: int = 30
    min_photos: int = TRAIN_DEFAULTS.min_photos
    max_photo_mb: int = 20
    intake_processes: int = 2  # processes decoding uploaded photos, each capped at 1 GiB and 30 s a photo
    max_queued_generations: int = 3
    max_prompt_chars: int = 600
    picture_retention_days: int = 30  # days the files of generated pictures are kept; 0: for ever
    train_steps: int = TRAIN_DEFAULTS.steps
    train_rank: int = TRAIN_DEFAULTS.rank
    train_resolution: int = 0  # 0: the base model's own (jobs.train_defaults: 512 px on SD1.x, 1024 on SDXL)
    train_learning_rate: float = TRAIN_DEFAULTS.learning_rate
    class_images: int = TRAIN_DEFAULTS.num_class_images
    train_checkpoint_every: int = TRAIN_DEFAULTS.checkpoint_every  # 0 turns them off
    train_preview_every: int = 200  # steps between preview pictures in the progress message; 0: none
    progress_interval_s: float = 3.0
    compile_generation: bool = True  # on a GPU: compile the model for generation at worker start
    # ... and also for the static shapes of one and four square pictures: faster, longer first start
    compile_static_shapes: bool = True
    compile_training: bool = True  # on a GPU: compile the training step at worker start
    # on a GPU: processes compiling parts of a worker's start beside it; -1: as many as fit, 0: none
    start_helpers: int = -1
    heartbeat_file: Path | None = None  # rewritten while connected to Discord (bot.health); None: none
    # --- who may use it (bot.access) ---
    allowed_guilds: tuple[int, ...] = ()  # server ids; empty: any server the bot is in
    allowed_roles: tuple[str, ...] = ()  # role ids or names, each optionally "<server id>:<role>"; empty: anyone
    allow_user_install: bool = False  # people outside the allowed servers may use it as their own app
    admin_user_ids: tuple[int, ...] = ()  # the bot's operators: every /admin command, on every server
    access_cache_s: float = 300.0  # how long a membership and role check is trusted
    require_consent: bool = True  # ask once, with buttons, before the first photo of a person is kept
    consent_text: str = DEFAULT_CONSENT_TEXT
    # --- how much (bot.quotas); /admin limits overrides the first five per server ---
    trainings_per_day: int = 2
    pictures_per_day: int = 100
    train_cooldown_min: int = 60  # minutes between the start of two trainings of one person
    server_trainings_per_day: int = 20  # all people of one server together; 0: no server total
    server_pictures_per_day: int = 1000
    max_queued_jobs: int = 50  # jobs waiting, all people together
    # --- what it may draw (bot.safety, trainer.safety) ---
    safety: str = "images"  # off | prompts | images
    safety_checker: str = ""  # the image classifier; empty: the standard one for BASE_MODEL
    blocked_words_file: Path | None = None  # the operator's own words and phrases, added to the shipped list
    nsfw_in_age_restricted: bool = False  # age-restricted channels may receive what the filter blocks

    @property
    def max_photo_bytes(self) -> int:
        return self.max_photo_mb * 1024 * 1024

    @property
    def max_job_message_bytes(self) -> int:
        return self.max_job_message_mb * MB

    @property
    def default_limits(self) -> Limits:
        """The quotas of a server that set none of its own with /admin limits."""
        return Limits(self.trainings_per_day, self.pictures_per_day, self.train_cooldown_min,
                      self.server_trainings_per_day, self.server_pictures_per_day)

    def train_config(self, steps: int | None = None) -> TrainConfig:
        """A training's settings as the operator set them (`steps`: a person's own number of steps); the
        worker fills in what depends on the base model and was left unset (jobs.train_defaults)."""
        chosen = ("resolution",) if self.train_resolution else ()
        return replace(TRAIN_DEFAULTS, steps=steps or self.train_steps, rank=self.train_rank,
                       resolution=self.train_resolution or TRAIN_DEFAULTS.resolution,
                       learning_rate=self.train_learning_rate, num_class_images=self.class_images,
                       checkpoint_every=self.train_checkpoint_every, preview_every=self.train_preview_every,
                       min_photos=self.min_photos, family_defaults=left_to_family(chosen))


# Environment variable for each field; the same names appear in README.md.
ENV_NAMES: dict[str, str] = {f.name: f.name.upper() for f in fields(Settings)}


def _parse(name: str, raw: str, kind: type, problems: list[str]) -> object:
    env = ENV_NAMES[name]
    if kind is bool:
        switch = parse_switch(raw)
        if switch is not None:
            return switch
        problems.append(f"{env}={raw!r} is not on or off; use 1 or 0.")
        return None
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        problems.append(f"{env}={raw!r} is not a {'whole number' if kind is int else 'number'}.")
        return None
    return raw


def _parse_ids(name: str, raw: str, problems: list[str]) -> tuple[int, ...] | None:
    """A comma-separated list of Discord ids (snowflakes: whole numbers)."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    bad = [item for item in items if not item.isdigit()]
    if bad:
        problems.append(f"{ENV_NAMES[name]} has {', '.join(repr(b) for b in bad)}, which "
                        f"{'is not an id' if len(bad) == 1 else 'are not ids'}; list Discord ids (Developer Mode, "
                        "right-click, Copy ID) separated by commas.")
        return None
    return tuple(int(item) for item in items)


def _check_data_dir(path: Path, problems: list[str]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        problems.append(f"DATA_DIR={str(path)!r} is not a writable folder ({exc.strerror or exc}); "
                        "create it or point DATA_DIR somewhere this user can write.")


def load_settings(environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env"),
                  require_token: bool = True) -> Settings:
    """Read settings from `environ` (default: the process environment) over the `.env` file."""
    values = {**env_file_values(env_file), **(os.environ if environ is None else environ)}

    problems: list[str] = []
    kwargs: dict[str, object] = {}
    for f in fields(Settings):
        raw = values.get(ENV_NAMES[f.name])
        if raw is None or raw.strip() == "":
            continue
        raw = raw.strip()
        if f.name in _PATHS:
            kwargs[f.name] = Path(raw).expanduser()
        elif f.name in _ID_LISTS:
            kwargs[f.name] = _parse_ids(f.name, raw, problems)
        elif f.name in _NAME_LISTS:
            kwargs[f.name] = tuple(item.strip() for item in raw.split(",") if item.strip())
        elif f.name == "dev_guild_id":
            kwargs[f.name] = _parse(f.name, raw, int, problems)
        else:
            kind = {bool: bool, int: int, float: float}.get(type(f.default), str)
            kwargs[f.name] = _parse(f.name, raw, kind, problems)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    settings = Settings(**kwargs)  # type: ignore[arg-type]

    if require_token and not settings.discord_token:
        problems.append("DISCORD_TOKEN is not set.")
    if not _DEVICE.match(settings.device):
        problems.append(f"DEVICE={settings.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if settings.log_level.upper() not in _LOG_LEVELS:
        problems.append(f"LOG_LEVEL={settings.log_level!r} is unknown; use one of {', '.join(_LOG_LEVELS)}.")
    if settings.job_backend not in _BACKENDS:
        problems.append(f"JOB_BACKEND={settings.job_backend!r} is unknown; use one of {', '.join(_BACKENDS)}.")
    for name in ("max_photos", "min_photos", "max_photo_mb", "intake_processes", "train_steps", "train_rank",
                 "class_images", "max_queued_generations", "max_prompt_chars", "max_queued_jobs"):
        if getattr(settings, name) < 1:
            problems.append(f"{ENV_NAMES[name]} must be at least 1.")
    if settings.intake_processes > 32:
        problems.append("INTAKE_PROCESSES must be at most 32 (each may take 1 GiB of memory); 2 suit most servers.")
    if not (math.isfinite(settings.train_learning_rate) and settings.train_learning_rate > 0):
        problems.append("TRAIN_LEARNING_RATE must be a positive number (1e-4 suits LoRA DreamBooth).")
    if not (math.isfinite(settings.progress_interval_s) and settings.progress_interval_s >= 0):
        problems.append("PROGRESS_INTERVAL_S must be 0 or a positive number of seconds.")
    if settings.job_backend == "celery" and not settings.redis_url.startswith(_REDIS_SCHEMES):
        problems.append(f"REDIS_URL must start with {', '.join(_REDIS_SCHEMES)} "
                        "(e.g. redis://localhost:6379/0).")
    if settings.job_backend == "celery" and (problem := secret_problem(settings.job_secret)) is not None:
        problems.append(problem)
    if settings.max_job_message_mb < 1:
        problems.append("MAX_JOB_MESSAGE_MB must be at least 1.")
    if settings.train_checkpoint_every < 0:
        problems.append("TRAIN_CHECKPOINT_EVERY must be 0 (no checkpoints) or a positive number of steps.")
    if settings.train_preview_every < 0:
        problems.append("TRAIN_PREVIEW_EVERY must be 0 (no previews) or a positive number of steps.")
    if settings.picture_retention_days < 0:
        problems.append("PICTURE_RETENTION_DAYS must be 0 (keep pictures for ever) or a positive number of days.")
    if settings.workers < 0:
        problems.append("WORKERS must be 0 (one per GPU) or a positive number.")
    if settings.min_photos > settings.max_photos:
        problems.append("MIN_PHOTOS is larger than MAX_PHOTOS; nobody could ever train.")
    if settings.train_resolution and (settings.train_resolution % 8 or settings.train_resolution < 64):
        problems.append("TRAIN_RESOLUTION must be 0 (the base model's own) or a multiple of 8, at least 64 "
                        "(512 for SD1.5, 1024 for SDXL).")
    for name in ("discord_api_base", "discord_gateway_url"):
        url = getattr(settings, name)
        scheme = ("http://", "https://") if name == "discord_api_base" else ("ws://", "wss://")
        if url and not url.startswith(scheme):
            problems.append(f"{ENV_NAMES[name]}={url!r} must start with {' or '.join(scheme)}.")
    for name in ("trainings_per_day", "pictures_per_day", "train_cooldown_min", "server_trainings_per_day",
                 "server_pictures_per_day"):
        if getattr(settings, name) < 0:
            problems.append(f"{ENV_NAMES[name]} must be 0 (no limit) or a positive number.")
    if not (math.isfinite(settings.access_cache_s) and 0 <= settings.access_cache_s <= 86400):
        problems.append("ACCESS_CACHE_S must be 0 to 86400 seconds (300 suits most servers).")
    if settings.quantize not in QUANTIZE_MODES:
        problems.append(f"QUANTIZE={settings.quantize!r} is unknown; use one of {', '.join(QUANTIZE_MODES)}.")
    elif settings.quantize != "none" and settings.base_model in SD_BASES:
        problems.append(f"QUANTIZE={settings.quantize} works with Flux base models only, and BASE_MODEL="
                        f"{settings.base_model} is Stable Diffusion; set QUANTIZE=none.")
    if settings.safety not in SAFETY_MODES:
        problems.append(f"SAFETY={settings.safety!r} is unknown; use one of {', '.join(SAFETY_MODES)}.")
    if settings.require_consent and not settings.consent_text.strip():
        problems.append("CONSENT_TEXT is empty; leave it unset for the default text, or write your own.")
    if len(settings.consent_text) > 1500:
        problems.append("CONSENT_TEXT is longer than 1500 characters; Discord shows at most 2000 in a message.")
    if settings.blocked_words_file is not None and not settings.blocked_words_file.is_file():
        problems.append(f"BLOCKED_WORDS_FILE={str(settings.blocked_words_file)!r} is not a file; point it at a "
                        "text file with one word or phrase a line, or leave it unset.")
    _check_data_dir(settings.data_dir, problems)
    if settings.heartbeat_file is not None and not os.access(settings.heartbeat_file.parent, os.W_OK):
        problems.append(f"HEARTBEAT_FILE={str(settings.heartbeat_file)!r} is not in a writable folder; "
                        "point it at a file in one (e.g. /tmp/bot-heartbeat) or leave it unset.")
    if problems:
        raise ConfigError(problems)
    return settings
