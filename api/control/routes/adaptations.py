"""The adaptation job routes. Thin: schema in, cheap checks, repository, queue, schema out.

Plain `def` handlers: the database and boto3 calls block, and FastAPI runs these in its threadpool.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi import Path as PathParam
from sqlalchemy.orm import Session

from api.common.auth import PrincipalDep
from api.common.errors import ServiceUnavailable, error_responses
from api.control.deps import QueueDep, SessionDep, SettingsDep, StoreOpener, StoreOpenerDep
from api.control.queue import JobQueue
from services.config import Settings
from services.errors import EvalSetError, InvalidRequest, JobNotFound, ObjectNotFound
from services.evalset import list_eval_items
from services.jobs import repository
from services.jobs.series import MIN_POINTS, downsampled_series
from services.jobs.states import JobStatus
from services.locations import check_request_locations
from services.schemas.jobs import (
    MAX_INT,
    MAX_NAME_CHARS,
    TAG_PATTERN,
    AdaptationCreate,
    AdaptationPublic,
    AdaptationsPage,
    DatasetSpec,
    LogLine,
    LogsPage,
    MetricPoint,
    MetricSeries,
    MetricsPage,
    SeriesPoints,
    TrainJobMessage,
    requested_gpus,
)
from services.storage.keys import adaptation_prefix, join_key
from services.storage.uri import FileURI, parse_uri

logger = logging.getLogger(__name__)

# The most metric rows one series request reads: a week of rows every few seconds.
MAX_SERIES_ROWS = 500_000
MAX_SERIES_POINTS = 10_000

router = APIRouter(prefix="/adaptations", tags=["adaptations"])

_EXAMPLE_ID = "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"
AdaptationId = Annotated[str, PathParam(description="The job id (a UUID)", examples=[_EXAMPLE_ID])]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="Repeating a request with the same key returns the same job instead of a new one",
        examples=["3f1c2a9e-retry-safe-key"],
    ),
]


def job_id_of(raw: str) -> str:
    """The canonical form of a job id; a string that is not a UUID names no job (404)."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise JobNotFound(raw[:64]) from None


def check_dataset(dataset: DatasetSpec, settings: Settings, opener: StoreOpener) -> None:
    """Cheap submit-time checks: a file:// folder exists; an s3:// bucket exists, its prefix is not empty."""
    location = parse_uri(dataset.uri)
    if isinstance(location, FileURI):
        # check_request_locations has already refused local folders outside the embedded mode.
        if not location.path.is_dir():
            raise InvalidRequest(f"dataset folder {str(location.path)!r} does not exist or is not a folder")
        return
    store, prefix = opener(location)
    # Listing stops after the first object, so this costs one ListObjectsV2 page at most.
    if next(iter(store.iter_keys(prefix)), None) is None:
        raise InvalidRequest(
            f"dataset prefix {prefix!r} in bucket {location.bucket!r} holds no objects: "
            "upload the images there or fix dataset.uri"
        )


def check_eval(body: AdaptationCreate, opener: StoreOpener) -> None:
    """Submit-time checks of the eval set: its manifest or class folders exist, it is not empty, and
    every label is a class name (missing images are found by the worker, before it trains)."""
    if body.eval is None:
        return
    uri = body.eval.uri
    store, key = opener(parse_uri(uri))
    try:
        list_eval_items(store, key, uri, body.class_names)
    except ObjectNotFound:
        raise EvalSetError(f"the eval manifest {uri} does not exist") from None


def _enqueue(session: Session, queue: JobQueue, job_id: str, gpus: int = 1) -> None:
    """Send the job to the workers; if that fails, fail the job (no worker would see it) and answer 503."""
    try:
        task_id = queue.submit(TrainJobMessage(job_id=job_id, gpus=gpus))
    except Exception as exc:
        logger.exception("could not enqueue adaptation job %s", job_id)
        # The exception's text may hold the broker URL and its password: only its type is shown.
        reason = f"the job could not be queued ({type(exc).__name__}); the broker was unreachable"
        repository.mark_failed(session, job_id, error_type="QueueUnavailable", message=reason)
        raise ServiceUnavailable(
            f"the job queue is unreachable; adaptation job {job_id!r} was recorded as failed, retry later"
        ) from exc
    repository.set_celery_task_id(session, job_id, task_id=task_id)


@router.post(
    "",
    status_code=HTTPStatus.ACCEPTED,
    response_model=AdaptationPublic,
    responses=error_responses(413, 415, 422, 503),
)
def create_adaptation(
    body: AdaptationCreate,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> AdaptationPublic:
    """Submit an adaptation job: validate it, record it as queued and enqueue it for a GPU worker."""
    check_request_locations(body, settings)
    check_dataset(body.dataset, settings, opener)
    check_eval(body, opener)
    request = body.model_dump(mode="json")
    job = repository.create_job(
        session, request=request, idempotency_key=idempotency_key, tenant=principal.tenant
    )
    # Enqueue a new job, or a replayed one whose first submission died between commit and enqueue.
    # A duplicate message is harmless: the worker's lease in the database runs a job only once.
    if job.status == JobStatus.QUEUED and job.celery_task_id is None:
        _enqueue(session, queue, job.id, requested_gpus(job.request))
    return AdaptationPublic.from_job(repository.get_job(session, job.id))


@router.get("", response_model=AdaptationsPage, responses=error_responses(422))
def list_adaptations(
    session: SessionDep,
    principal: PrincipalDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs with this status")] = None,
    name: Annotated[
        str | None,
        Query(min_length=1, max_length=MAX_NAME_CHARS, description="Only jobs with this exact name"),
    ] = None,
    tag: Annotated[str | None, Query(pattern=TAG_PATTERN, description="Only jobs carrying this tag")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> AdaptationsPage:
    """List your adaptation jobs (an admin key: everyone's), newest first, optionally filtered by status,
    name and tag."""
    jobs, total = repository.list_jobs(
        session, status=status, limit=limit, offset=offset, tenant=principal.scope, name=name, tag=tag
    )
    items = [AdaptationPublic.from_job(job) for job in jobs]
    return AdaptationsPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{adaptation_id}", response_model=AdaptationPublic, responses=error_responses(404))
def get_adaptation(
    adaptation_id: AdaptationId, session: SessionDep, principal: PrincipalDep
) -> AdaptationPublic:
    """Get one adaptation job: status, progress, latest metrics, image counts, artifact and error."""
    return AdaptationPublic.from_job(
        repository.get_job(session, job_id_of(adaptation_id), tenant=principal.scope)
    )


@router.post(
    "/{adaptation_id}/cancel",
    status_code=HTTPStatus.ACCEPTED,
    response_model=AdaptationPublic,
    responses=error_responses(404, 409),
)
def cancel_adaptation(
    adaptation_id: AdaptationId, session: SessionDep, principal: PrincipalDep
) -> AdaptationPublic:
    """Cancel a job: a queued one at once, a running one at its next step (409 if already finished)."""
    job = repository.request_cancel(session, job_id_of(adaptation_id), tenant=principal.scope)
    return AdaptationPublic.from_job(job)


@router.get("/{adaptation_id}/metrics", response_model=MetricsPage, responses=error_responses(404, 422))
def list_adaptation_metrics(
    adaptation_id: AdaptationId,
    session: SessionDep,
    principal: PrincipalDep,
    since_step: Annotated[int, Query(ge=0, le=MAX_INT, description="First training step to return")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricsPage:
    """Get a job's metric history in step order, for plots (page on with `since_step`)."""
    job_id = job_id_of(adaptation_id)
    metrics = repository.list_metrics(
        session, job_id, since_step=since_step, limit=limit, tenant=principal.scope
    )
    return MetricsPage(adaptation_id=job_id, items=[MetricPoint.from_metric(m) for m in metrics])


@router.get(
    "/{adaptation_id}/metrics/series", response_model=MetricSeries, responses=error_responses(404, 422)
)
def get_adaptation_metric_series(
    adaptation_id: AdaptationId,
    session: SessionDep,
    principal: PrincipalDep,
    max_points: Annotated[
        int, Query(ge=MIN_POINTS, le=MAX_SERIES_POINTS, description="The most points per series")
    ] = 1000,
) -> MetricSeries:
    """Get a job's whole metric history as one series per metric, each downsampled on the server to
    at most `max_points` (first, last, and each step bucket's lowest and highest value), for plots."""
    job_id = job_id_of(adaptation_id)
    rows = repository.metric_rows(session, job_id, limit=MAX_SERIES_ROWS, tenant=principal.scope)
    series = downsampled_series(rows, max_points)
    return MetricSeries(
        adaptation_id=job_id,
        rows=len(rows),
        max_points=max_points,
        last_step=rows[-1][0] if rows else None,
        series={name: SeriesPoints(steps=s.steps, values=s.values) for name, s in series.items()},
    )


@router.get("/{adaptation_id}/logs", response_model=LogsPage, responses=error_responses(404, 422))
def list_adaptation_logs(
    adaptation_id: AdaptationId,
    session: SessionDep,
    principal: PrincipalDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="Only lines with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> LogsPage:
    """Get the worker's log lines for a job, oldest first (page on with `after`)."""
    job_id = job_id_of(adaptation_id)
    lines = repository.list_log_lines(session, job_id, after=after, limit=limit, tenant=principal.scope)
    return LogsPage(adaptation_id=job_id, items=[LogLine.from_row(line) for line in lines])


@router.delete(
    "/{adaptation_id}",
    status_code=HTTPStatus.NO_CONTENT,
    response_class=Response,
    responses=error_responses(404, 409, 503),
)
def delete_adaptation(
    adaptation_id: AdaptationId,
    session: SessionDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> Response:
    """Delete a job with its classifier, checkpoints and metrics (a queued job is cancelled first; 409
    while it runs). A deleted job is gone: deleting it again answers 404."""
    job_id = job_id_of(adaptation_id)
    repository.stop_for_delete(session, job_id, tenant=principal.scope)
    # Files first, row last: if the store fails (503), the job is still listed and a retry finishes it.
    store, prefix = opener(settings.storage.artifacts_uri)
    removed = store.delete_prefix(join_key(prefix, adaptation_prefix(job_id)))
    if not repository.delete_job(session, job_id):
        raise JobNotFound(job_id)  # a concurrent delete got there first
    logger.info("deleted adaptation job %s and %d stored files", job_id, removed)
    return Response(status_code=HTTPStatus.NO_CONTENT)
