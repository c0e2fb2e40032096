"""Domain errors of the shared core; the HTTP layer maps each class to a status code in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every error the core raises on purpose; `message` is safe to show to users."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(DomainError):
    """No adaptation job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"adaptation job {job_id!r} does not exist")
        self.job_id = job_id


class PredictionNotFound(DomainError):
    """No batch prediction run has this id (or it belongs to another tenant)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"prediction run {run_id!r} does not exist")
        self.run_id = run_id


class InvalidJobTransition(DomainError):
    """The job's current status does not allow the requested change."""

    def __init__(self, old: str, new: str, job_id: str | None = None) -> None:
        subject = f"adaptation job {job_id!r}" if job_id else "a job"
        super().__init__(f"{subject} cannot go from {old!r} to {new!r}")
        self.old, self.new, self.job_id = old, new, job_id


class JobBusy(DomainError):
    """The job is running, so the requested change (deleting it) must wait until it stops."""


class ArtifactNotReady(DomainError):
    """The job has not succeeded, so it has no classifier (yet) to download."""


class ArtifactMissing(DomainError):
    """The job has no usable artifact yet (not finished, or the stored files are gone)."""


class InvalidRequest(DomainError):
    """The caller sent something the core cannot accept (bad URI, bad key, reused idempotency key)."""


class EvalSetError(InvalidRequest):
    """The labelled eval set cannot be used: unknown labels, a bad manifest, missing objects, no images."""


class StorageError(DomainError):
    """The object store failed or refused an operation."""


class StorageUnavailable(StorageError):
    """The object store could not be reached or answered with a server error: worth retrying later."""


class BucketNotFound(StorageError):
    """The bucket (or local root folder) does not exist."""

    def __init__(self, bucket: str) -> None:
        super().__init__(f"bucket or folder {bucket!r} does not exist")
        self.bucket = bucket


class ObjectNotFound(StorageError):
    """No object has this key."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"object {uri!r} does not exist")
        self.uri = uri


class ObjectTooLarge(StorageError):
    """The object is larger than the configured read limit."""

    def __init__(self, uri: str, limit: int, size: int | None = None) -> None:
        seen = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"object {uri!r}{seen} is larger than the {limit}-byte read limit")
        self.uri, self.limit, self.size = uri, limit, size


class RequestTooLarge(DomainError):
    """The request is over a size limit (body bytes, files, pixels) and was not processed."""
