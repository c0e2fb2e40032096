"""The job state machine."""

from __future__ import annotations

import pytest

from services.errors import InvalidJobTransition
from services.jobs.states import TERMINAL_STATUSES, JobStatus, can_transition, check_transition, sources_of

S = JobStatus


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.QUEUED, S.RUNNING),
        (S.QUEUED, S.CANCELLED),
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCELLED),
        (S.RUNNING, S.QUEUED),
    ],
)
def test_allowed(old: JobStatus, new: JobStatus) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [(S.QUEUED, S.SUCCEEDED), (S.SUCCEEDED, S.RUNNING), (S.FAILED, S.QUEUED), (S.CANCELLED, S.RUNNING)],
)
def test_forbidden(old: JobStatus, new: JobStatus) -> None:
    with pytest.raises(InvalidJobTransition, match=f"from '{old.value}' to '{new.value}'"):
        check_transition(old, new, job_id="j1")


def test_terminal_statuses_go_nowhere() -> None:
    for old in TERMINAL_STATUSES:
        assert not any(can_transition(old, new) for new in JobStatus)


def test_sources_of() -> None:
    assert sources_of(S.RUNNING) == {S.QUEUED}
    assert sources_of(S.CANCELLED) == {S.QUEUED, S.RUNNING}
    assert sources_of(S.SUCCEEDED) == {S.RUNNING}
