"""Batch prediction runs: a succeeded adaptation classifies every image under a prefix into a JSONL.

The run is queued for a worker like an adaptation job; its results file is kept with the adaptation
in the artifacts store and streamed through this API (the key comes from the run's id, never from
the request).
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from api.common.auth import PrincipalDep
from api.common.errors import ServiceUnavailable, error_responses
from api.control.deps import QueueDep, SessionDep, SettingsDep, StoreOpenerDep
from api.control.routes.adaptations import check_dataset, job_id_of
from services.errors import ArtifactNotReady, JobNotFound, PredictionNotFound
from services.jobs import predictions, repository
from services.jobs.states import JobStatus
from services.locations import check_location
from services.schemas.jobs import MAX_INT, DatasetSpec
from services.schemas.predictions import (
    PredictionCreate,
    PredictionMessage,
    PredictionPublic,
    PredictionsPage,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/predictions", tags=["predictions"])

RunId = Annotated[str, PathParam(description="The prediction run's id (a UUID)")]


def _run_id(raw: str) -> str:
    try:
        return job_id_of(raw)
    except JobNotFound:
        raise PredictionNotFound(raw[:64]) from None


@router.post(
    "",
    status_code=HTTPStatus.ACCEPTED,
    response_model=PredictionPublic,
    responses=error_responses(404, 409, 422, 503),
)
def create_prediction(
    body: PredictionCreate,
    session: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> PredictionPublic:
    """Classify every image under `source` with a succeeded adaptation, as a queued run; the results
    are one JSONL line per image (key, label, abstained, top labels with probabilities, or an error)."""
    job = repository.get_job(session, job_id_of(body.adaptation_id), tenant=principal.scope)
    if job.status != JobStatus.SUCCEEDED or not job.artifact_sha256:
        raise ArtifactNotReady(
            f"adaptation job {job.id!r} is {job.status.value}; only a succeeded job's classifier can predict"
        )
    check_location(body.source, "source", settings)
    check_dataset(DatasetSpec(uri=body.source), settings, opener)
    request = body.model_dump(mode="json") | {"adaptation_id": job.id}
    run = predictions.create_run(session, job_id=job.id, tenant=job.tenant, request=request)
    try:
        task_id = queue.submit_prediction(PredictionMessage(run_id=run.id))
    except Exception as exc:
        logger.exception("could not enqueue prediction run %s", run.id)
        reason = f"the run could not be queued ({type(exc).__name__}); the broker was unreachable"
        predictions.fail_run(session, run.id, error_type="QueueUnavailable", message=reason)
        raise ServiceUnavailable(
            f"the job queue is unreachable; prediction run {run.id!r} failed, retry later"
        ) from exc
    predictions.set_task_id(session, run.id, task_id=task_id)
    return PredictionPublic.from_run(predictions.get_run(session, run.id))


@router.get("", response_model=PredictionsPage, responses=error_responses(422))
def list_predictions(
    session: SessionDep,
    principal: PrincipalDep,
    adaptation_id: Annotated[uuid.UUID | None, Query(description="Only runs of this adaptation")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> PredictionsPage:
    """List your prediction runs (an admin key: everyone's), newest first."""
    job_id = str(adaptation_id) if adaptation_id is not None else None
    runs, total = predictions.list_runs(
        session, tenant=principal.scope, adaptation_id=job_id, limit=limit, offset=offset
    )
    return PredictionsPage(
        items=[PredictionPublic.from_run(run) for run in runs], total=total, limit=limit, offset=offset
    )


@router.get("/{run_id}", response_model=PredictionPublic, responses=error_responses(404))
def get_prediction(run_id: RunId, session: SessionDep, principal: PrincipalDep) -> PredictionPublic:
    """Get one prediction run: status, counts, and where its results are once it succeeded."""
    return PredictionPublic.from_run(predictions.get_run(session, _run_id(run_id), tenant=principal.scope))


@router.get(
    "/{run_id}/results",
    response_class=StreamingResponse,
    responses={
        HTTPStatus.OK: {"content": {"application/x-ndjson": {}}, "description": "One JSON object per image"},
        **error_responses(404, 409, 503),
    },
)
def stream_prediction_results(
    run_id: RunId,
    session: SessionDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """Stream a succeeded run's JSONL (its sha256 is in the `X-Must-Sha256` header and the run)."""
    run = predictions.get_run(session, _run_id(run_id), tenant=principal.scope)
    if run.status != JobStatus.SUCCEEDED or run.results_key is None:
        raise ArtifactNotReady(
            f"prediction run {run.id!r} is {run.status.value}; results come when it succeeds"
        )
    store, _ = opener(settings.storage.artifacts_uri)
    size, chunks = store.open_stream(run.results_key)
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="predictions-{run.id}.jsonl"',
        "X-Must-Sha256": str(run.results_sha256),
    }
    return StreamingResponse(chunks, media_type="application/x-ndjson", headers=headers)
