"""The trainer's command line: train a LoRA from a folder of photos, imagine with it, build test models.

    python -m trainer make-model tiny models/tiny
    python -m trainer make-safety-checker models/flag-all --flag-all
    python -m trainer train --photos selfies/ --handle alex --class man --out loras/alex --model models/tiny
    python -m trainer imagine --lora loras/alex "alex man as an astronaut" --n 4 --out images/

`run(argv)` does the work and returns the lines to show as the result; progress bars (tqdm) follow
the same events the bot turns into Discord messages, and other messages go through `logging`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import shlex
import signal
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from common.envfile import env_file_values, parse_switch
from jobs import events
from jobs.png_parameters import model_name
from jobs.requests import (
    DEFAULT_BASE_MODEL,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_STEPS,
    MAX_TRAIN_STEPS,
    MIN_TRAIN_STEPS,
    TRAIN_DEFAULTS,
    GenerateRequest,
    TrainConfig,
)
from jobs.signing import DEFAULT_MAX_MESSAGE_MB
from jobs.train_defaults import FAMILY_DEFAULTS, left_to_family
from jobs.worker_config import QUANTIZE_MODES
from trainer.checkpoint_archive import CheckpointSaved
from trainer.errors import BadPhoto, Cancelled, TooFewPhotos, TrainerError

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"}


def default_class_cache() -> Path:
    """Shared class images live with other caches (XDG_CACHE_HOME or ~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "avatar-trainer" / "class-images"


class ProgressBars:
    """An event sink drawing one tqdm bar per stage with progress; previews are saved as PNG files."""

    def __init__(self, preview_dir: Path | None = None) -> None:
        self.preview_dir = preview_dir
        self.bar: tqdm | None = None
        self.bar_stage: str | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, events.Stage):
            self.close()
            log.info("%s%s", event.stage.replace("_", " "), f": {event.detail}" if event.detail else "")
        elif isinstance(event, events.Progress):
            if self.bar is None or self.bar_stage != event.stage:
                self.close()
                self.bar = tqdm(total=event.total, desc=event.stage.replace("_", " "), unit="step")
                self.bar_stage = event.stage
            self.bar.update(event.step - self.bar.n)
            if event.loss is not None:
                self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        elif isinstance(event, CheckpointSaved):
            log.debug("checkpoint at step %d: %s", event.step, event.path)
        elif isinstance(event, events.Preview) and self.preview_dir is not None:
            self.preview_dir.mkdir(parents=True, exist_ok=True)
            (self.preview_dir / f"step-{event.step:05d}.png").write_bytes(event.png)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def cancel_on_interrupt() -> Iterator[list[bool]]:
    """The first Ctrl-C asks the training to stop after the current step (a second one stops at once)."""
    flag = [False]
    previous = signal.getsignal(signal.SIGINT)

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        log.warning("stopping after this step (press Ctrl-C again to stop at once)")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def read_photos(folder: Path) -> list[bytes]:
    """Normalise every photo in `folder` as the bot does; refused or repeated photos are skipped with a
    warning saying why."""
    from photos.intake import IntakeError, check_duplicates, normalise_photo

    if not folder.is_dir():
        raise BadPhoto(f"The photo folder {folder} does not exist.")
    kept: list[Any] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES):
        try:
            photo = normalise_photo(path.read_bytes())
            check_duplicates(photo, [(k.sha256, k.phash) for k in kept])
        except IntakeError as exc:
            log.warning("skipping %s: %s", path.name, exc.message)
            continue
        for warning in photo.warnings:
            log.warning("%s: %s", path.name, warning)
        kept.append(photo)
    return [p.png for p in kept]


def cmd_make_model(args: argparse.Namespace) -> list[str]:
    from trainer.pipelines import save_random_model

    out = save_random_model(args.kind, args.out, seed=args.seed)
    return [f"model: {out}"]


def cmd_make_safety_checker(args: argparse.Namespace) -> list[str]:
    from trainer.safety_checker import save_stand_in

    out = save_stand_in(args.out, flag_all=args.flag_all, seed=args.seed)
    return [f"safety checker: {out} (flags {'every picture' if args.flag_all else 'none'})"]


def checked_names(handle: str, class_word: str) -> tuple[str, str]:
    """The handle and class word under the bot's rules, with the bot's messages."""
    from jobs.handles import NameRuleError, normalize_class_word, validate_handle

    try:
        word = normalize_class_word(class_word)
        return validate_handle(handle, word), word
    except NameRuleError as exc:
        raise TrainerError(str(exc), "bad_handle") from exc


def default_compile_cache() -> Path:
    """Where compiled kernels are kept between runs: beside the class images, shared by the worker and
    the command line."""
    return default_class_cache().parent / "compiled"


def cmd_train(args: argparse.Namespace) -> list[str]:
    from trainer import compile_choice
    from trainer.dreambooth import CHECKPOINT_NAME, train
    from trainer.pipelines import pick_device

    args.handle, args.class_word = checked_names(args.handle, args.class_word)
    photos = read_photos(args.photos)
    if not photos:
        raise TooFewPhotos(f"No usable photos were found in {args.photos}.")
    overrides = {
        "steps": args.steps, "rank": args.rank, "resolution": args.resolution, "learning_rate": args.lr,
        "seed": args.seed, "checkpoint_every": args.checkpoint_every, "preview_every": args.preview_every,
        "num_class_images": args.class_images, "min_photos": args.min_photos,
        "prior_preservation": args.prior,
    }
    chosen = {k: v for k, v in overrides.items() if v is not None}
    try:
        # What depends on the base model and was not given follows it (jobs.train_defaults).
        config = TrainConfig(**chosen, family_defaults=left_to_family(chosen),
                             train_text_encoder=args.train_text_encoder,
                             gradient_checkpointing=args.gradient_checkpointing)
    except ValueError as exc:
        raise TrainerError(f"Invalid training settings: {exc}.", "bad_settings") from exc
    device = pick_device(args.device)
    settings = {"model": args.model, "rank": config.rank, "resolution": args.resolution or "the model's",
                "batch": config.batch_size, "prior": config.prior_preservation}
    choice = compile_choice.choose("train", device, args.compile, args.compile_cache, settings, config.steps,
                                   compile_choice.training_costs(config.prior_preservation),
                                   graphed=config.graphs_on(device.split(":", 1)[0]))
    config = dataclasses.replace(config, compiled_stages=choice.compile)
    out: Path = args.out
    work_dir = args.work_dir or out / "checkpoints"
    bars = ProgressBars(preview_dir=out / "previews")
    try:
        with cancel_on_interrupt() as stop:
            result = train(photos, args.handle, args.class_word, config, base_model=args.model, out_dir=out,
                           work_dir=work_dir, class_cache_dir=args.class_cache, device=device,
                           on_event=bars, should_cancel=lambda: stop[0], resume_from=args.resume,
                           quantize=args.quantize)
    except Cancelled as exc:
        checkpoint = work_dir / CHECKPOINT_NAME
        if checkpoint.exists():
            raise Cancelled(f"{exc.message} Continue later with --resume {checkpoint}") from exc
        raise
    finally:
        bars.close()
    choice.finished()
    return [f"lora: {result.lora_path}", f"kohya: {result.kohya_path}", f"steps: {result.steps}",
            f"final loss: {result.final_loss:.4f}",
            "try: " + shlex.join(["python", "-m", "trainer", "imagine", "--lora", str(out), "--model", str(args.model),
                                  "--out", str(out / "images"),
                                  f"a photo of {args.handle} {args.class_word} as an astronaut"])]


def lora_file(path: Path) -> tuple[Path, dict[str, str]]:
    """Accept the LoRA's folder or the file itself; return the file and the metadata in its header."""
    from trainer.lora_io import DIFFUSERS_NAME, read_metadata

    file = path / DIFFUSERS_NAME if path.is_dir() else path
    if not file.is_file():
        raise TrainerError(f"No LoRA file was found at {path} (expected {DIFFUSERS_NAME}).", "missing_lora")
    try:
        return file, read_metadata(file)
    except Exception as exc:  # safetensors raises its own error types for anything unreadable
        raise TrainerError(f"{file} is not a LoRA file (a .safetensors file written by `train`).",
                           "bad_lora") from exc


def writable_folder(folder: Path) -> Path:
    """Make `folder` and check a file can be written there, before any work that would be lost."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise TrainerError(f"Pictures cannot be written to {folder} ({exc.strerror or exc}). "
                           "Choose another folder with --out.", "bad_out") from exc
    return folder


def cmd_imagine(args: argparse.Namespace) -> list[str]:
    from trainer import compile_choice
    from trainer.engine import GenerationEngine
    from trainer.lora_io import safe_file_stem
    from trainer.pipelines import load_pipeline, pick_device
    from trainer.prompts import compose_prompt

    # Everything that can be refused is checked before the model loads.
    fields: dict[str, Any] = {"prompt": args.prompt, "num_images": args.n, "face_pass": args.face_pass}
    for name, value in (("negative_prompt", args.negative), ("seed", args.seed), ("steps", args.steps),
                        ("guidance", args.guidance)):
        if value is not None:
            fields[name] = value
    request = GenerateRequest(**fields)
    lora, meta = lora_file(args.lora) if args.lora else (None, {})
    out = writable_folder(args.out)
    handle, class_word = meta.get("handle"), meta.get("class_word")
    log.info("prompt: %s", compose_prompt(request.prompt, handle, class_word, request.style))
    model = args.model or meta.get("base_model") or DEFAULT_BASE_MODEL
    device = pick_device(args.device)
    choice = compile_choice.choose("imagine", device, args.compile, args.compile_cache,
                                   {"model": model, "pictures": request.num_images, "size": "the model's"},
                                   request.num_images * request.steps, compile_choice.GENERATION,
                                   graphed=device.startswith("cuda"))
    pipe = load_pipeline(model, device=device, quantize=args.quantize)
    engine = GenerationEngine(pipe, model_name=model_name(model), compile_blocks=choice.compile)
    key = hashlib.sha256(lora.read_bytes()).hexdigest()[:16] if lora else None
    bars = ProgressBars()
    try:
        images = engine.generate(request, adapter_key=key, lora_path=lora, handle=handle, class_word=class_word,
                                 on_event=bars)
    finally:
        bars.close()
    choice.finished()
    stem = safe_file_stem(meta.get("handle", "image"))
    lines = []
    for i, image in enumerate(images):
        path = out / f"{stem}-{i}-seed{image.seed}.png"
        try:
            path.write_bytes(image.png)
        except OSError as exc:
            raise TrainerError(f"Could not write {path} ({exc.strerror or exc}); "
                               f"{len(lines)} picture(s) were saved before it.", "bad_out") from exc
        lines.append(f"image: {path}")
    return lines


def cmd_worker(args: argparse.Namespace) -> list[str]:
    from common.child_env import SECRET_VARIABLES
    from common.logs import setup_logging
    from jobs.signing import MB, secret_problem
    from jobs.worker_config import SAFETY_MODES, WorkerConfig, safety_checker_to_load
    from trainer import scratch
    from trainer.celery_worker import default_name, serve
    from trainer.quiet_notices import quiet_known_noise

    # Read already: no process this worker starts needs them (the bot's token least of all).
    for variable in SECRET_VARIABLES:
        os.environ.pop(variable, None)
    if (problem := secret_problem(args.job_secret)) is not None:
        raise TrainerError(problem, "bad_settings")
    if args.max_message_mb < 1:
        raise TrainerError("MAX_JOB_MESSAGE_MB must be at least 1.", "bad_settings")
    if args.safety not in SAFETY_MODES:
        raise TrainerError(f"SAFETY={args.safety!r} is unknown; use one of {', '.join(SAFETY_MODES)}.", "bad_settings")
    if args.quantize not in QUANTIZE_MODES:  # argparse checks a value given, not the default from QUANTIZE
        raise TrainerError(f"QUANTIZE={args.quantize!r} is unknown; use one of {', '.join(QUANTIZE_MODES)}.",
                           "bad_settings")
    setup_logging(args.log_level.upper(), secrets=[args.job_secret])
    quiet_known_noise()
    name = args.name or default_name()
    work = args.work_dir or scratch.WORKER_DATA / name
    try:
        with scratch.held(work):
            scratch.sweep()  # what killed workers on this host left behind
            serve(WorkerConfig(base_model=args.model, device=args.device, work_dir=str(work / "work"),
                               class_cache_dir=str(args.class_cache), log_level=args.log_level.upper(),
                               compile_generation=args.compile, compile_static_shapes=args.static_shapes,
                               compile_cache_dir=str(args.compile_cache),
                               compile_training=args.compile_training, train_rank=args.train_rank,
                               start_helpers=args.start_helpers,
                               safety_checker=safety_checker_to_load(args.safety, args.safety_checker),
                               quantize=args.quantize),
                  args.redis_url, name, args.job_secret, max_message_bytes=args.max_message_mb * MB,
                  remove_work_dir=args.work_dir is None)
    finally:
        if args.work_dir is None:  # worker-data/NAME held only the work folder, now removed
            with contextlib.suppress(OSError):
                work.rmdir()
    return [f"worker {name} stopped"]


class DefaultsHelp(argparse.HelpFormatter):
    """`--help` shows each option's default where it has one (not the None of "decided later")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.option_strings and not any(action.default is v for v in (None, False, True, argparse.SUPPRESS))
                and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


GENERATE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GenerateRequest)}


def add_compile_options(command: argparse.ArgumentParser) -> None:
    """`--compile/--no-compile` and `--compile-cache` for a command that decides by itself (trainer.compile_choice)."""
    command.add_argument("--compile", action=argparse.BooleanOptionalAction,
                         help="compile for the GPU, or not (default: only when the compiled cache is warm or "
                              "the job is long enough for compiling to pay back; the log says which and why)")
    command.add_argument("--compile-cache", type=Path, default=default_compile_cache(),
                         help="where compiled kernels are kept between runs (TORCHINDUCTOR_CACHE_DIR wins)")


def add_quantize_option(command: argparse.ArgumentParser, default: str = QUANTIZE_MODES[0], prefix: str = "") -> None:
    """`--quantize`: how the base model's Flux transformer is kept (trainer.quantization)."""
    command.add_argument("--quantize", default=default, choices=QUANTIZE_MODES,
                         help=prefix + "int8 keeps a Flux transformer's weights in int8, for 24 GB GPUs "
                                       "(Flux only; see README)")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; the worker's defaults come from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make-model", help="build a random offline model (tiny for tests and demos)")
    make.add_argument("kind", choices=["tiny", "sd15-random", "tiny-sdxl", "sdxl-random", "tiny-flux"])
    make.add_argument("out", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=cmd_make_model)

    checker = sub.add_parser("make-safety-checker",
                             help="build a tiny random image checker for tests (SAFETY_CHECKER)")
    checker.add_argument("out", type=Path)
    verdict = checker.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--flag-all", action="store_true", help="it flags every picture")
    verdict.add_argument("--flag-none", action="store_true", help="it flags no picture")
    checker.add_argument("--seed", type=int, default=0)
    checker.set_defaults(func=cmd_make_safety_checker)

    tr = sub.add_parser("train", help="train a LoRA of a person from a folder of photos", formatter_class=DefaultsHelp)
    tr.add_argument("--photos", type=Path, required=True, help="folder of JPEG/PNG/WebP/HEIC photos")
    tr.add_argument("--handle", required=True, help="the word that will mean this person in prompts")
    tr.add_argument("--class", dest="class_word", required=True, help="woman, man, person, ...")
    tr.add_argument("--out", type=Path, required=True, help="folder for the LoRA files")
    tr.add_argument("--model", default=DEFAULT_BASE_MODEL, help="tiny, a Hugging Face id, a folder or a .safetensors")
    d = TRAIN_DEFAULTS
    tr.add_argument("--steps", type=int, default=d.steps,
                    help=f"training steps, at least 1 (the bot allows {MIN_TRAIN_STEPS} to {MAX_TRAIN_STEPS})")
    tr.add_argument("--rank", type=int, default=d.rank,
                    help="LoRA rank, at least 1: a larger one learns more detail and makes a bigger file")
    tr.add_argument("--resolution", type=int,
                    help=f"training size in pixels, a multiple of 8 (default: the base model's, {d.resolution} for "
                         f"SD1.x, {FAMILY_DEFAULTS['sdxl']['resolution']} for SDXL)")
    tr.add_argument("--lr", type=float, default=d.learning_rate, help="learning rate")
    tr.add_argument("--seed", type=int, default=d.seed, help="random seed")
    tr.add_argument("--class-images", type=int, default=d.num_class_images,
                    help="class images for prior preservation")
    tr.add_argument("--min-photos", type=int, default=d.min_photos, help="fewest usable photos to train on")
    tr.add_argument("--prior", action=argparse.BooleanOptionalAction,
                    help="prior preservation with class images (default: the base model's; on for Stable "
                         "Diffusion, off for Flux)")
    tr.add_argument("--train-text-encoder", action="store_true",
                    help="also train the text encoder: sometimes more likeness, more memory")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="less GPU memory, slower")
    tr.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="save a resumable point every N steps")
    tr.add_argument("--preview-every", type=int, help="save a preview image every N steps")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    tr.add_argument("--resume", type=Path, help="a checkpoint.safetensors to continue from")
    tr.add_argument("--work-dir", type=Path, help="where checkpoints go (default: OUT/checkpoints)")
    tr.add_argument("--class-cache", type=Path, default=default_class_cache())
    add_quantize_option(tr)
    add_compile_options(tr)
    tr.set_defaults(func=cmd_train)

    im = sub.add_parser("imagine", help="generate images, with a trained LoRA or without", formatter_class=DefaultsHelp)
    im.add_argument("prompt")
    im.add_argument("--lora", type=Path, help="a LoRA folder or pytorch_lora_weights.safetensors")
    im.add_argument("--n", type=int, default=MAX_IMAGES, help=f"how many images, 1 to {MAX_IMAGES}")
    im.add_argument("--out", type=Path, required=True, help="folder for the pictures")
    im.add_argument("--model", help="default: the base model recorded in the LoRA")
    im.add_argument("--seed", type=int, help="random seed (default: a new one each time)")
    im.add_argument("--steps", type=int, default=GENERATE_DEFAULTS["steps"], help=f"denoising steps, 1 to {MAX_STEPS}")
    im.add_argument("--guidance", type=float, default=GENERATE_DEFAULTS["guidance"],
                    help=f"guidance scale, 0 to {MAX_GUIDANCE:g} (default: the base model's, 7 for Stable "
                         "Diffusion, 3.5 for Flux)")
    im.add_argument("--negative", help="negative prompt")
    im.add_argument("--no-face-pass", dest="face_pass", action="store_false",
                    help="leave faces as drawn (default: faces found are redrawn with the LoRA at its native size)")
    im.add_argument("--device", default="auto")
    add_quantize_option(im)
    add_compile_options(im)
    im.set_defaults(func=cmd_imagine)

    wk = sub.add_parser("worker", help="serve a bot's jobs on this machine's GPU through Celery and Redis",
                        formatter_class=DefaultsHelp)
    wk.add_argument("--redis-url", default=env.get("REDIS_URL", "redis://localhost:6379/0"))
    wk.add_argument("--model", default=env.get("BASE_MODEL", DEFAULT_BASE_MODEL),
                    help="the same base model as the bot's BASE_MODEL")
    wk.add_argument("--device", default=env.get("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N or mps")
    wk.add_argument("--name", help="unique worker name (default: host name and process id)")
    wk.add_argument("--work-dir", type=Path, help="scratch space (default: worker-data/NAME)")
    wk.add_argument("--class-cache", type=Path, default=default_class_cache())
    wk.add_argument("--no-compile", dest="compile", action="store_false",
                    default=parse_switch(env.get("COMPILE_GENERATION", "1")) is not False,
                    help="do not compile the model for generation (COMPILE_GENERATION=0 does the same)")
    wk.add_argument("--no-static-shapes", dest="static_shapes", action="store_false",
                    default=parse_switch(env.get("COMPILE_STATIC_SHAPES", "1")) is not False,
                    help="compile generation for dynamic shapes only: a shorter first start, square pictures "
                         "1.08x slower (COMPILE_STATIC_SHAPES=0 does the same)")
    wk.add_argument("--no-compile-training", dest="compile_training", action="store_false",
                    default=parse_switch(env.get("COMPILE_TRAINING", "1")) is not False,
                    help="do not compile the training step (COMPILE_TRAINING=0 does the same)")
    # String defaults: argparse converts them only when `worker` runs, and says so kindly if they are
    # not numbers; a blank value (as a shared .env may hold) means the default, as for the bot.
    wk.add_argument("--train-rank", type=int, default=env.get("TRAIN_RANK", "").strip() or str(TRAIN_DEFAULTS.rank),
                    help="the bot's TRAIN_RANK: the LoRA rank whose training is compiled at start")
    wk.add_argument("--start-helpers", type=int, default=env.get("START_HELPERS", "").strip() or "-1",
                    help="processes compiling parts of the worker's first start beside it: -1 as many as "
                         "the GPU and the CPUs allow, 0 none (START_HELPERS does the same)")
    wk.add_argument("--compile-cache", type=Path, default=default_compile_cache(),
                    help="where compiled kernels are kept between starts")
    wk.add_argument("--max-message-mb", type=int,
                    default=env.get("MAX_JOB_MESSAGE_MB", "").strip() or str(DEFAULT_MAX_MESSAGE_MB),
                    help="the bot's MAX_JOB_MESSAGE_MB: a larger message is dropped unread")
    add_quantize_option(wk, env.get("QUANTIZE", "").strip() or QUANTIZE_MODES[0], "the bot's QUANTIZE: ")
    wk.add_argument("--safety", default=env.get("SAFETY", "").strip() or "images",
                    help="the bot's SAFETY: with images, every picture goes through the image checker")
    wk.add_argument("--safety-checker", default=env.get("SAFETY_CHECKER", "").strip(),
                    help="the bot's SAFETY_CHECKER: a Hugging Face id or folder; empty, the standard one")
    # The secret shared with the bot comes from JOB_SECRET alone: a command line shows in `ps`.
    wk.set_defaults(func=cmd_worker, job_secret=env.get("JOB_SECRET", "").strip())
    return parser


def worker_environment(env_file: Path = Path(".env")) -> dict[str, str]:
    """The process environment over the `.env` file in the working directory, read as the bot reads
    its settings: a GPU machine that shares the bot's `.env` gets the same values. Nothing is added
    to `os.environ`, so the bot's token in that file does not reach the worker's child processes (and
    `worker` takes it out of `os.environ` when it is there, as with docker compose's env_file)."""
    return {**env_file_values(env_file), **os.environ}


def run(argv: list[str] | None = None) -> list[str]:
    """Parse `argv`, run the command and return its result lines; TrainerError says what went wrong."""
    args = build_parser(worker_environment()).parse_args(argv)
    logging.getLogger().setLevel(args.log_level.upper())
    return args.func(args)
