"""The engine's exception hierarchy; callers map these to HTTP errors or job failures."""

from __future__ import annotations


class MustError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(MustError):
    """The model cannot be built: unknown architecture, non-ViT tower, bad or missing weights."""


class WeightsUnavailable(ModelLoadError):
    """A pretrained tag's weights are not in the local cache and could not be downloaded.

    `transient`: the download was tried and failed (unreachable, too slow), so a later try may
    work; False when downloads are turned off, which no retry changes.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class DatasetError(MustError):
    """The images cannot be used: missing folder, no readable image, too few images."""


class ConfigError(MustError):
    """Invalid class names, templates or hyperparameters."""


class CheckpointError(MustError):
    """A checkpoint or exported classifier is missing, corrupt or does not match."""


class Cancelled(MustError):  # noqa: N818 - a signal, not a failure
    """Training stopped because the cancellation check asked it to."""


class DistributedRunError(MustError):
    """The processes of a distributed run stopped before it finished (one died, restarts used up)."""
