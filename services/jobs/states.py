"""The adaptation job state machine: statuses, phases and the transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum

from services.errors import InvalidJobTransition


class JobStatus(StrEnum):
    """Where a job is in its life; the three last ones are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobPhase(StrEnum):
    """What a job is doing right now, in the order a job goes through them.

    LISTING lasts until the first image of the data set is found, STAGING while the images (and
    the labelled eval set, if any) download; DONE is the instant a job succeeded.
    """

    QUEUED = "queued"
    LISTING = "listing"
    STAGING = "staging"
    SCORING_ZERO_SHOT = "scoring_zero_shot"
    TRAINING = "training"
    EXPORTING = "exporting"
    EVALUATING = "evaluating"
    DONE = "done"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # queued -> failed covers a job that could not even be enqueued (broker down).
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # running -> queued is the reconciler re-enqueueing a job whose worker died (stale lease).
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    """Whether a job may move from `old` to `new`."""
    return new in ALLOWED_TRANSITIONS[old]


def check_transition(old: JobStatus, new: JobStatus, *, job_id: str | None = None) -> None:
    """Raise InvalidJobTransition unless a job may move from `old` to `new`."""
    if not can_transition(old, new):
        raise InvalidJobTransition(old.value, new.value, job_id)


def sources_of(new: JobStatus) -> frozenset[JobStatus]:
    """Every status from which a job may move to `new` (used in conditional UPDATE ... WHERE)."""
    return frozenset(old for old, targets in ALLOWED_TRANSITIONS.items() if new in targets)
