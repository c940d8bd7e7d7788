"""Exceptions raised for bad user input or bad checkpoint folders.

Every exception is a ``ValueError`` (so ``except ValueError`` keeps working for callers that do
not know this module) whose message names the offending input and what was expected.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "ImageError",
    "MessageError",
    "MiniCPMVError",
    "PromptTooLongError",
    "UnsupportedVersionError",
    "VideoError",
]


class MiniCPMVError(ValueError):
    """Base class of every error this package raises for bad input."""


class ImageError(MiniCPMVError):
    """An image could not be read, is empty, too large, or has an unusable pixel mode."""


class VideoError(MiniCPMVError):
    """A video could not be opened or decoded, or the sampling parameters are invalid."""


class MessageError(MiniCPMVError):
    """A conversation (list of ``{"role", "content"}`` messages) is malformed."""


class UnsupportedVersionError(MiniCPMVError):
    """The checkpoint's ``config.json`` names a MiniCPM-V version this package does not handle."""


class CheckpointError(MiniCPMVError):
    """A checkpoint folder is missing files or holds inconsistent settings."""


class PromptTooLongError(MiniCPMVError):
    """The tokenised prompt exceeds the maximum input length in a way that cannot be truncated."""


class DataError(MiniCPMVError):
    """A fine-tuning sample is malformed; the message names the sample id and the field."""

    def __init__(self, sample_id: str, field: str, message: str):
        super().__init__(f"sample {sample_id!r}, field {field!r}: {message}")
        self.sample_id = sample_id
        self.field = field
