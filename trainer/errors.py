"""Errors the trainer raises, each carrying a message a person can act on."""

from __future__ import annotations


class TrainerError(Exception):
    """A failure with a stable `code` and a `message` written for the person who asked."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class TooFewPhotos(TrainerError):
    code = "too_few_photos"


class OutOfMemory(TrainerError):
    code = "out_of_memory"


class ModelUnavailable(TrainerError):
    code = "model_unavailable"


class DiskFull(TrainerError):
    code = "disk_full"


class PromptTooLong(TrainerError):
    code = "prompt_too_long"


class Cancelled(TrainerError):
    code = "cancelled"

    def __init__(self, message: str = "The job was cancelled.") -> None:
        super().__init__(message)


class DeviceUnavailable(TrainerError):
    code = "device_unavailable"


class BadCheckpoint(TrainerError):
    code = "bad_checkpoint"


class BadPhoto(TrainerError):
    code = "bad_photo"


class MissingDependency(TrainerError):
    code = "missing_dependency"
