"""ORM models of the job database: adaptation jobs, their metric, phase and log history, and API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.config import DEFAULT_TENANT
from services.db.base import Base
from services.db.types import UTCDateTime, utcnow
from services.jobs.states import JobPhase, JobStatus

# Stored as VARCHAR with the enum *values*, not a native PostgreSQL ENUM, so adding a status
# needs no ALTER TYPE and SQLite behaves the same.
# https://docs.sqlalchemy.org/en/20/core/type_basics.html#sqlalchemy.types.Enum
_STATUS = Enum(JobStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
_PHASE = Enum(JobPhase, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])
# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


def new_job_id() -> str:
    """A fresh random job id."""
    return str(uuid.uuid4())


class Job(Base):
    """One adaptation job: its request, lifecycle, progress, lease and results."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        Index("ix_jobs_tenant_name", "tenant", "name"),
        # An idempotency key names one job of its tenant; two tenants may use the same key.
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    status: Mapped[JobStatus] = mapped_column(_STATUS, default=JobStatus.QUEUED)
    phase: Mapped[JobPhase | None] = mapped_column(_PHASE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # The project whose API key submitted the job; other tenants' keys cannot see it.
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    # An optional name, and the tags as one string `,a,b,` (see migration 0006 and jobs.repository).
    name: Mapped[str | None] = mapped_column(String(255))
    tags: Mapped[str | None] = mapped_column(String(1400))
    num_classes: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    # When the job's queue message was last sent (by the API, a requeue or the reconciler).
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer)
    images_per_sec: Mapped[float | None] = mapped_column()
    eta_seconds: Mapped[float | None] = mapped_column()
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    images_used: Mapped[int] = mapped_column(Integer, default=0)
    images_skipped: Mapped[int] = mapped_column(Integer, default=0)
    skipped_reasons: Mapped[dict[str, int] | None] = mapped_column(JSON)

    artifact_uri: Mapped[str | None] = mapped_column(Text)
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    # Which classifier the label-free guard chose to serve ("zero_shot", "teacher", "student",
    # "teacher@<step>"), and the report it chose on (reason, candidates, views, threshold).
    served: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Scores on the labelled eval set, when the request named one (EvaluationReport's fields).
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    error_type: Mapped[str | None] = mapped_column(String(255))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)

    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times the job went back to the queue because the object store could not be reached.
    storage_requeues: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)

    metrics: Mapped[list[JobMetric]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, lazy="raise"
    )
    # Loaded with the job (one extra query per page of jobs), as every public view shows them.
    phases: Mapped[list[JobPhaseSpan]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
        order_by="JobPhaseSpan.id",
    )


class JobMetric(Base):
    """One row of a job's metric history (for plots), keyed by training step."""

    __tablename__ = "job_metrics"
    __table_args__ = (Index("ix_job_metrics_job_id_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="metrics", lazy="raise")


class JobPhaseSpan(Base):
    """One phase a job went through, from when it started to when the next one did (None: still in it)."""

    __tablename__ = "job_phases"
    __table_args__ = (Index("ix_job_phases_job_id_started_at", "job_id", "started_at"),)

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    phase: Mapped[JobPhase] = mapped_column(_PHASE)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    job: Mapped[Job] = relationship(back_populates="phases", lazy="raise")


class JobLogLine(Base):
    """One line the worker logged while running a job, for `GET /adaptations/{id}/logs`."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    logger: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)


class PredictionRun(Base):
    """A batch prediction: a succeeded adaptation classifying every image under a prefix into a JSONL."""

    __tablename__ = "prediction_runs"
    __table_args__ = (
        Index("ix_prediction_runs_tenant_created_at", "tenant", "created_at"),
        Index("ix_prediction_runs_job_id", "job_id"),
        Index("ix_prediction_runs_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    # The adaptation whose classifier runs; deleting it deletes its runs (and their results files).
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    status: Mapped[JobStatus] = mapped_column(_STATUS, default=JobStatus.QUEUED)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    # When the run's message was last sent, for the reconciler's lost-message check.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The worker running it renews this lease; an expired one means the worker died (run requeued).
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    images_failed: Mapped[int] = mapped_column(Integer, default=0)
    images_abstained: Mapped[int] = mapped_column(Integer, default=0)
    results_key: Mapped[str | None] = mapped_column(Text)
    results_sha256: Mapped[str | None] = mapped_column(String(64))
    results_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error_type: Mapped[str | None] = mapped_column(String(255))
    error_message: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """An API key of one tenant, stored as its SHA-256 (the key itself is shown once, at creation).

    Keys are 256-bit random strings, so a fast unsalted hash is enough: nothing can be guessed
    from it, and the index on it finds a key in one lookup.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key, so an operator can tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
