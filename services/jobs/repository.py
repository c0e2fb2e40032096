"""Job database operations: keyword-only functions taking a Session; each mutation commits.

Status changes are conditional `UPDATE ... WHERE status IN (<allowed sources>)` statements, so two
processes racing on the same job cannot both succeed (PostgreSQL re-checks the WHERE clause on the
locked row under READ COMMITTED; SQLite serialises writers).
https://www.postgresql.org/docs/15/transaction-iso.html#XACT-READ-COMMITTED
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Delete, Update, delete, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.config import DEFAULT_TENANT
from services.db.models import Job, JobLogLine, JobMetric, JobPhaseSpan
from services.db.types import UTCDateTime, utcnow
from services.errors import InvalidRequest, JobBusy, JobNotFound
from services.jobs.states import TERMINAL_STATUSES, JobPhase, JobStatus, check_transition, sources_of

# Tracebacks are kept for debugging, not archiving; the tail holds the frame that raised.
MAX_TRACEBACK_CHARS = 20_000
MAX_ERROR_MESSAGE_CHARS = 4_000


def create_job(
    session: Session,
    *,
    request: dict[str, Any],
    idempotency_key: str | None,
    tenant: str = DEFAULT_TENANT,
) -> Job:
    """Insert a queued job, or return the tenant's job already created with the same idempotency key."""
    if idempotency_key is not None:
        existing = _find_by_key(session, tenant, idempotency_key)
        if existing is not None:
            return _same_request(existing, request)
    num_classes = len(request.get("class_names", []))
    now = utcnow()
    job = Job(
        request=request,
        idempotency_key=idempotency_key,
        num_classes=num_classes,
        tenant=tenant,
        created_at=now,
        phase=JobPhase.QUEUED,
        phases=[JobPhaseSpan(phase=JobPhase.QUEUED, started_at=now)],
        name=request.get("name"),
        tags=encode_tags(request.get("tags")),
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Another request with the same key won the insert race: hand back its job.
        session.rollback()
        existing = _find_by_key(session, tenant, idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise
        return _same_request(existing, request)
    return job


def encode_tags(tags: list[str] | None) -> str | None:
    """Tags as the one string the column holds, `,a,b,` (sorted), so `LIKE '%,a,%'` finds tag `a`."""
    return f",{','.join(sorted(set(tags)))}," if tags else None


def _find_by_key(session: Session, tenant: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)
    return session.scalars(stmt).one_or_none()


def _same_request(job: Job, request: dict[str, Any]) -> Job:
    """Refuse an idempotency key reused for a different request, as a retry must resend the same body."""
    if job.request != request:
        raise InvalidRequest("this Idempotency-Key was already used with a different request")
    return job


def get_job(session: Session, job_id: str, *, tenant: str | None = None) -> Job:
    """The job with this id, fresh from the database; JobNotFound if there is none.

    With `tenant`, another tenant's job is not found either (None: any tenant's, for admins
    and the platform's own processes).
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id)
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None = None,
    limit: int = 50,
    offset: int = 0,
    tenant: str | None = None,
    name: str | None = None,
    tag: str | None = None,
) -> tuple[list[Job], int]:
    """One page of jobs (of `tenant`, or of all), newest first, and the total count matching the filter
    (a status, an exact name, a tag the job carries)."""
    where = [Job.status == status] if status is not None else []
    if tenant is not None:
        where.append(Job.tenant == tenant)
    if name is not None:
        where.append(Job.name == name)
    if tag is not None:
        # autoescape: `_` and `%` in a tag match themselves, not any character.
        where.append(Job.tags.contains(f",{tag},", autoescape=True))
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    page = select(Job).where(*where).order_by(Job.created_at.desc(), Job.id.desc())
    return list(session.scalars(page.limit(limit).offset(offset))), total


def _execute(session: Session, stmt: Update | Delete) -> int:
    """Run one UPDATE, commit, and return how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(stmt.execution_options(synchronize_session=False)))
    session.commit()
    return result.rowcount


def _transition(
    session: Session,
    job_id: str,
    new: JobStatus,
    values: dict[str, Any],
    *,
    guard: tuple[ColumnElement[bool], ...] = (),
    sources: frozenset[JobStatus] | None = None,
) -> bool:
    """Move a job to `new` if its status allows it and `guard` holds; False if only the guard failed."""
    allowed = sources if sources is not None else sources_of(new)
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(allowed), *guard)
    rowcount = _execute(session, stmt.values(status=new, updated_at=utcnow(), **values))
    if rowcount == 1:
        return True
    job = get_job(session, job_id)
    if job.status != new and job.status not in allowed:
        check_transition(job.status, new, job_id=job_id)
    return False


def _update_running(session: Session, job_id: str, values: dict[str, Any], owner: str | None) -> bool:
    """Update fields of a running job (held by `owner` when given); False if it is not running or not held."""
    stmt = update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, *_owned_by(owner))
    rowcount = _execute(session, stmt.values(updated_at=utcnow(), **values))
    if rowcount == 0:
        get_job(session, job_id)
    return rowcount == 1


def _owned_by(owner: str | None) -> tuple[ColumnElement[bool], ...]:
    return () if owner is None else (Job.lease_owner == owner,)


def mark_running(
    session: Session, job_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Take the job's lease: wins only if queued, or running with an expired lease or the same owner.

    False means another worker holds a live lease; a finished job raises InvalidJobTransition.
    """
    now = now or utcnow()
    takeover = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now, Job.lease_owner == owner)
    values = {
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "heartbeat_at": now,
        "started_at": func.coalesce(Job.started_at, literal(now, UTCDateTime())),
    }
    guard = (or_(Job.status != JobStatus.RUNNING, takeover),)
    sources = sources_of(JobStatus.RUNNING) | {JobStatus.RUNNING}
    return _transition(session, job_id, JobStatus.RUNNING, values, guard=guard, sources=sources)


def heartbeat(
    session: Session, job_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Extend the lease held by `owner`; False if the job was taken over, requeued or finished."""
    now = now or utcnow()
    values = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_seconds)}
    return _update_running(session, job_id, values, owner)


def update_progress(
    session: Session,
    job_id: str,
    *,
    owner: str | None = None,
    step: int | None = None,
    total_steps: int | None = None,
    epoch: int | None = None,
    images_per_sec: float | None = None,
    eta_seconds: float | None = None,
    images_used: int | None = None,
    images_skipped: int | None = None,
    skipped_reasons: dict[str, int] | None = None,
    checkpoint_uri: str | None = None,
) -> bool:
    """Record the given progress fields (None leaves a field unchanged) of a running job."""
    fields = {
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "images_per_sec": images_per_sec,
        "eta_seconds": eta_seconds,
        "images_used": images_used,
        "images_skipped": images_skipped,
        "skipped_reasons": skipped_reasons,
        "checkpoint_uri": checkpoint_uri,
    }
    return _update_running(session, job_id, {k: v for k, v in fields.items() if v is not None}, owner)


def set_phase(session: Session, job_id: str, *, phase: JobPhase, owner: str | None = None) -> bool:
    """Record what the running job is doing now, ending its previous phase in the history."""
    now = utcnow()
    if not _update_running(session, job_id, {"phase": phase}, owner):
        return False
    _enter_phase(session, job_id, phase, now)
    return True


def _enter_phase(session: Session, job_id: str, phase: JobPhase | None, now: datetime) -> None:
    """End the job's open phase span at `now` and open one for `phase` (None: just end it).

    DONE is an instant: its span ends when it starts.
    """
    open_span = (JobPhaseSpan.job_id == job_id, JobPhaseSpan.ended_at.is_(None))
    session.execute(update(JobPhaseSpan).where(*open_span).values(ended_at=now))
    if phase is not None:
        ended = now if phase == JobPhase.DONE else None
        session.add(JobPhaseSpan(job_id=job_id, phase=phase, started_at=now, ended_at=ended))
    session.commit()


def list_phases(session: Session, job_id: str) -> list[JobPhaseSpan]:
    """The job's phase history, oldest first."""
    stmt = select(JobPhaseSpan).where(JobPhaseSpan.job_id == job_id).order_by(JobPhaseSpan.id)
    return list(session.scalars(stmt))


def append_log_lines(session: Session, job_id: str, lines: list[dict[str, Any]]) -> None:
    """Store worker log lines of the job: dicts with created_at, level, logger and message."""
    session.add_all(JobLogLine(job_id=job_id, **line) for line in lines)
    session.commit()


def list_log_lines(
    session: Session, job_id: str, *, after: int = 0, limit: int = 1000, tenant: str | None = None
) -> list[JobLogLine]:
    """The job's log lines with an id above `after`, oldest first."""
    get_job(session, job_id, tenant=tenant)
    stmt = select(JobLogLine).where(JobLogLine.job_id == job_id, JobLogLine.id > after)
    return list(session.scalars(stmt.order_by(JobLogLine.id).limit(limit)))


def count_log_lines(session: Session, job_id: str) -> int:
    """How many log lines the job has stored."""
    stmt = select(func.count()).select_from(JobLogLine).where(JobLogLine.job_id == job_id)
    return session.scalar(stmt) or 0


def set_celery_task_id(session: Session, job_id: str, *, task_id: str, now: datetime | None = None) -> None:
    """Remember the broker's task id (for inspection in Flower) and when the message was sent."""
    job = get_job(session, job_id)
    job.celery_task_id = task_id
    job.enqueued_at = now or utcnow()
    session.commit()


def append_metrics(session: Session, job_id: str, *, step: int, values: dict[str, Any]) -> JobMetric:
    """Add one metrics row to the job's history and make it the job's latest metrics."""
    get_job(session, job_id).latest_metrics = values
    metric = JobMetric(job_id=job_id, step=step, values=values)
    session.add(metric)
    session.commit()
    return metric


def list_metrics(
    session: Session, job_id: str, *, since_step: int = 0, limit: int = 1000, tenant: str | None = None
) -> list[JobMetric]:
    """The job's metric history from `since_step` on (inclusive), in step order."""
    get_job(session, job_id, tenant=tenant)
    stmt = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step >= since_step)
    return list(session.scalars(stmt.order_by(JobMetric.step, JobMetric.id).limit(limit)))


def metric_rows(
    session: Session, job_id: str, *, limit: int, tenant: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """The job's first `limit` metric rows as (step, values), in step order (only those two columns)."""
    get_job(session, job_id, tenant=tenant)
    stmt = select(JobMetric.step, JobMetric.values).where(JobMetric.job_id == job_id)
    rows = session.execute(stmt.order_by(JobMetric.step, JobMetric.id).limit(limit))
    return [(step, values) for step, values in rows]


def _finished(now: datetime) -> dict[str, Any]:
    return {"finished_at": now, "lease_owner": None, "lease_expires_at": None}


def mark_succeeded(
    session: Session,
    job_id: str,
    *,
    artifact_uri: str,
    artifact_sha256: str,
    owner: str | None = None,
    served: str | None = None,
    outcome: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> bool:
    """Finish the job with its published artifact, what it serves and its eval-set scores;
    False if `owner` lost it."""
    now = utcnow()
    values = {
        **_finished(now),
        "phase": JobPhase.DONE,
        "artifact_uri": artifact_uri,
        "artifact_sha256": artifact_sha256,
        "served": served,
        "outcome": outcome,
        "evaluation": evaluation,
    }
    return _finish(session, job_id, JobStatus.SUCCEEDED, values, owner, JobPhase.DONE)


def _finish(
    session: Session,
    job_id: str,
    new: JobStatus,
    values: dict[str, Any],
    owner: str | None,
    phase: JobPhase | None = None,
    sources: frozenset[JobStatus] | None = None,
) -> bool:
    """A transition that also ends the job's open phase span (and opens `phase`'s) when it wins."""
    if not _transition(session, job_id, new, values, guard=_owned_by(owner), sources=sources):
        return False
    _enter_phase(session, job_id, phase, values.get("finished_at") or utcnow())
    return True


def mark_failed(
    session: Session,
    job_id: str,
    *,
    error_type: str,
    message: str,
    traceback: str | None = None,
    owner: str | None = None,
) -> bool:
    """Finish the job as failed, keeping the error and the tail of its traceback."""
    values = {
        **_finished(utcnow()),
        "error_type": error_type[:255],
        "error_message": message[:MAX_ERROR_MESSAGE_CHARS],
        "error_traceback": traceback[-MAX_TRACEBACK_CHARS:] if traceback else None,
    }
    return _finish(session, job_id, JobStatus.FAILED, values, owner)


def mark_cancelled(session: Session, job_id: str, *, owner: str | None = None) -> bool:
    """Finish the job as cancelled (the worker noticed `cancel_requested`, or it never started)."""
    return _finish(session, job_id, JobStatus.CANCELLED, _finished(utcnow()), owner)


def request_cancel(session: Session, job_id: str, *, tenant: str | None = None) -> Job:
    """Cancel a queued job at once; ask a running one to stop. Repeating it is harmless."""
    get_job(session, job_id, tenant=tenant)
    queued_only = frozenset({JobStatus.QUEUED})
    if _finish(session, job_id, JobStatus.CANCELLED, _finished(utcnow()), None, sources=queued_only):
        return get_job(session, job_id)
    flagged = _update_running(session, job_id, {"cancel_requested": True}, owner=None)
    job = get_job(session, job_id)
    if not flagged and job.status != JobStatus.CANCELLED:
        check_transition(job.status, JobStatus.CANCELLED, job_id=job_id)
    return job


def stop_for_delete(session: Session, job_id: str, *, tenant: str | None = None) -> Job:
    """The job, finished: a queued one is cancelled first; a running one raises JobBusy (409).

    A running job is refused rather than stopped here: its worker would go on writing checkpoints
    into the folder being deleted until it notices the cancellation at its next step.
    """
    get_job(session, job_id, tenant=tenant)
    queued = update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
    _execute(session, queued.values(status=JobStatus.CANCELLED, updated_at=utcnow(), **_finished(utcnow())))
    job = get_job(session, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise JobBusy(
            f"adaptation job {job_id!r} is {job.status.value}: cancel it first "
            f"(POST /adaptations/{job_id}/cancel) and delete it once it has stopped"
        )
    return job


def delete_job(session: Session, job_id: str) -> bool:
    """Delete a finished job's metric history, phases, log lines and its row; False if there was no
    such finished job."""
    # A finished job never changes status again, so checking first and deleting after is race-free.
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status not in TERMINAL_STATUSES:
        session.rollback()
        return False
    # Metrics, phases and log lines go with the row: their foreign keys are ON DELETE CASCADE, which
    # PostgreSQL enforces and SQLite does too (db.session turns PRAGMA foreign_keys on).
    return _execute(session, delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATUSES))) == 1


def finished_with_checkpoints(session: Session, *, finished_before: datetime) -> list[str]:
    """Ids of jobs that finished before the cutoff and still record a stored checkpoint."""
    stmt = select(Job.id).where(
        Job.status.in_(TERMINAL_STATUSES), Job.finished_at < finished_before, Job.checkpoint_uri.is_not(None)
    )
    return list(session.scalars(stmt.order_by(Job.finished_at)))


def forget_checkpoints(session: Session, job_id: str) -> bool:
    """Record that a finished job's checkpoints were deleted (its `checkpoint_uri` becomes null)."""
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATUSES))
    return _execute(session, stmt.values(checkpoint_uri=None)) == 1


def queued_before(session: Session, cutoff: datetime) -> list[tuple[str, str | None]]:
    """(id, task id) of the queued jobs whose message was last sent (or which were made) before `cutoff`."""
    sent_before = or_(Job.enqueued_at < cutoff, Job.enqueued_at.is_(None) & (Job.created_at < cutoff))
    stmt = select(Job.id, Job.celery_task_id).where(Job.status == JobStatus.QUEUED, sent_before)
    return [(job_id, task_id) for job_id, task_id in session.execute(stmt.order_by(Job.created_at))]


def claim_resend(session: Session, job_id: str, *, cutoff: datetime, now: datetime | None = None) -> bool:
    """Mark a still-queued job's message as sent now, if nobody did since `cutoff`; True if this call won."""
    sent_before = or_(Job.enqueued_at < cutoff, Job.enqueued_at.is_(None))
    stmt = update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED, sent_before)
    return _execute(session, stmt.values(enqueued_at=now or utcnow())) == 1


def requeue_running(session: Session, job_id: str, *, owner: str, storage_outage: bool = False) -> bool:
    """Give a running job held by `owner` back to the queue (to resume elsewhere); False if not held.

    `storage_outage` counts the requeue in `storage_requeues` (the object store could not be reached).
    """
    values: dict[str, Any] = {**_requeued(), "attempts": Job.attempts + 1}
    if storage_outage:
        values["storage_requeues"] = Job.storage_requeues + 1
    return _finish(session, job_id, JobStatus.QUEUED, values, owner, JobPhase.QUEUED)


def _requeued() -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_at": None, "phase": JobPhase.QUEUED}


def requeue_stale(session: Session, *, now: datetime | None = None) -> list[str]:
    """Put running jobs whose lease expired back in the queue (cancel those asked to stop)."""
    now = now or utcnow()
    expired = (Job.lease_expires_at < now,)
    stale = session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING, *expired)).all()
    requeued = []
    for job_id in stale:
        cancelled = (Job.cancel_requested.is_(True),)
        if _transition(session, job_id, JobStatus.CANCELLED, _finished(now), guard=expired + cancelled):
            _enter_phase(session, job_id, None, now)
            continue
        values = {**_requeued(), "attempts": Job.attempts + 1}
        if _transition(session, job_id, JobStatus.QUEUED, values, guard=expired):
            _enter_phase(session, job_id, JobPhase.QUEUED, now)
            requeued.append(job_id)
    return requeued
