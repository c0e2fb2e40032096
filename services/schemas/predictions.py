"""Boundary models of batch prediction (`POST /predictions`): request, public view, queue message."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.jobs.states import JobStatus
from services.schemas.jobs import MAX_INT, _storage_uri

if TYPE_CHECKING:
    from services.db.models import PredictionRun

# A JSONL record lists at most this many labels per image (as /predict's top_k).
MAX_TOP_K = 1000


class PredictionCreate(BaseModel):
    """Classify every image under a prefix with a succeeded adaptation; the results are one JSONL file."""

    model_config = ConfigDict(extra="forbid")

    adaptation_id: str = Field(description="A succeeded adaptation's id", max_length=64)
    source: str = Field(
        description="`s3://bucket/prefix/` (or `file:///abs/path` in embedded mode): every image under it",
        examples=["s3://my-images/incoming/2026-11-30/"],
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description="Labels listed per image")
    min_probability: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Abstain (label null, abstained true) below this top probability; omitted: the "
        "adaptation's own min_probability, if its job set one",
    )
    max_images: int | None = Field(default=None, ge=1, le=MAX_INT, description="Classify at most this many")

    _source = field_validator("source")(_storage_uri)


class PredictionMessage(BaseModel):
    """What the API puts on the queue: the run's id only; the worker reads the rest from the database."""

    run_id: str


class PredictionPublic(BaseModel):
    """A batch prediction run as the API shows it."""

    id: str
    adaptation_id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    images_done: int = Field(description="Images read so far, classified or not")
    images_failed: int = Field(description="Images that could not be used (their records hold an error)")
    images_abstained: int
    results_sha256: str | None = Field(description="SHA-256 of the JSONL, once succeeded")
    results_bytes: int | None
    results_url: str | None = Field(description="Where to read the JSONL (this API streams it)")
    error_type: str | None
    error_message: str | None
    request: dict[str, Any] = Field(description="The request as accepted")

    @classmethod
    def from_run(cls, run: PredictionRun) -> PredictionPublic:
        done = run.status == JobStatus.SUCCEEDED
        return cls(
            id=run.id,
            adaptation_id=run.job_id,
            status=run.status,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            images_done=run.images_done,
            images_failed=run.images_failed,
            images_abstained=run.images_abstained,
            results_sha256=run.results_sha256,
            results_bytes=run.results_bytes,
            results_url=f"/predictions/{run.id}/results" if done else None,
            error_type=run.error_type,
            error_message=run.error_message,
            request=run.request,
        )


class PredictionsPage(BaseModel):
    """One page of prediction runs, newest first."""

    items: list[PredictionPublic]
    total: int
    limit: int
    offset: int
