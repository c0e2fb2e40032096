"""Download a succeeded job's classifier: presigned S3 URLs, or streams through this API.

The file names are a fixed pair and the keys come from the job id, so no request names a key or
a path of its own. Plain `def` handlers: boto3 and file reads block (FastAPI runs them in its
threadpool, and iterates a sync streaming body in it too).
"""

from __future__ import annotations

import hashlib
from http import HTTPStatus
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from api.common.auth import PrincipalDep
from api.common.errors import error_responses
from api.control.deps import SessionDep, SettingsDep, StoreOpener, StoreOpenerDep
from api.control.routes.adaptations import AdaptationId, job_id_of
from services.config import Settings
from services.db.models import Job
from services.errors import ArtifactMissing, ArtifactNotReady
from services.jobs import repository
from services.jobs.states import JobStatus
from services.schemas.jobs import ArtifactDownload, ArtifactFile
from services.storage import keys
from services.storage.base import ObjectStore
from services.storage.s3 import S3ObjectStore

router = APIRouter(prefix="/adaptations", tags=["adaptations"])

# A manifest is a few kilobytes; anything far larger is not one of ours.
MAX_MANIFEST_BYTES = 4 << 20
WEIGHTS, MANIFEST = keys.CLASSIFIER_FILES
FileName = Annotated[
    Literal["model.safetensors", "manifest.json"], PathParam(description="Which file of the classifier")
]


def _succeeded(session: SessionDep, job_id: str, tenant: str | None) -> Job:
    job = repository.get_job(session, job_id, tenant=tenant)
    if job.status != JobStatus.SUCCEEDED or not job.artifact_sha256:
        raise ArtifactNotReady(
            f"adaptation job {job_id!r} is {job.status.value}; only a succeeded job has a classifier"
        )
    return job


def _stored_sizes(store: ObjectStore, prefix: str, job_id: str) -> dict[str, int]:
    """{file name: size} of the job's stored classifier; ArtifactMissing if a file is gone."""
    folder = keys.join_key(prefix, keys.classifier_key(job_id, WEIGHTS)).rsplit("/", 1)[0] + "/"
    sizes = {info.key[len(folder) :]: info.size for info in store.iter_keys(folder)}
    missing = [name for name in keys.CLASSIFIER_FILES if name not in sizes]
    if missing:
        raise ArtifactMissing(f"adaptation job {job_id!r}: the stored classifier lacks {', '.join(missing)}")
    return sizes


def _url(
    store: ObjectStore, key: str, job_id: str, name: str, opener: StoreOpener, settings: Settings
) -> str:
    if isinstance(store, S3ObjectStore):
        expires = settings.storage.download_url_seconds
        return store.presigned_get(key, expires, client=opener.signing_client())
    return f"/adaptations/{job_id}/artifact/{name}"


@router.get(
    "/{adaptation_id}/artifact", response_model=ArtifactDownload, responses=error_responses(404, 409, 503)
)
def get_artifact(
    adaptation_id: AdaptationId,
    session: SessionDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> ArtifactDownload:
    """Where to download a succeeded job's classifier (weights and manifest), with sizes and sha256:
    presigned S3 URLs, or paths of this API that stream the files when the store is a local folder."""
    job_id = job_id_of(adaptation_id)
    job = _succeeded(session, job_id, principal.scope)
    store, prefix = opener(settings.storage.artifacts_uri)
    sizes = _stored_sizes(store, prefix, job_id)
    manifest = store.read_bytes(
        keys.join_key(prefix, keys.classifier_key(job_id, MANIFEST)), max_bytes=MAX_MANIFEST_BYTES
    )
    digests = {WEIGHTS: str(job.artifact_sha256), MANIFEST: hashlib.sha256(manifest).hexdigest()}
    files = [
        ArtifactFile(
            name=name,
            size=sizes[name],
            sha256=digests[name],
            url=_url(
                store,
                keys.join_key(prefix, keys.classifier_key(job_id, name)),
                job_id,
                name,
                opener,
                settings,
            ),
        )
        for name in keys.CLASSIFIER_FILES
    ]
    presigned = isinstance(store, S3ObjectStore)
    return ArtifactDownload(
        adaptation_id=job_id,
        sha256=str(job.artifact_sha256),
        served=job.served,
        expires_in_seconds=settings.storage.download_url_seconds if presigned else None,
        files=files,
    )


@router.get(
    "/{adaptation_id}/artifact/{name}",
    response_class=StreamingResponse,
    responses={
        HTTPStatus.OK: {"content": {"application/octet-stream": {}}, "description": "The file's bytes"},
        **error_responses(404, 409, 503),
    },
)
def stream_artifact_file(
    adaptation_id: AdaptationId,
    name: FileName,
    session: SessionDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """Stream one file of a succeeded job's classifier through this API (for any store)."""
    job_id = job_id_of(adaptation_id)
    job = _succeeded(session, job_id, principal.scope)
    store, prefix = opener(settings.storage.artifacts_uri)
    size, chunks = store.open_stream(keys.join_key(prefix, keys.classifier_key(job_id, name)))
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'}
    if name == WEIGHTS:
        headers["X-Must-Sha256"] = str(job.artifact_sha256)
    media = "application/json" if name == MANIFEST else "application/octet-stream"
    return StreamingResponse(chunks, media_type=media, headers=headers)
