"""Sample images per predicted class, for the dashboard: which images the served classifier put where.

The worker records a few dataset keys per class when the job succeeds (worker/samples.py); these
routes only ever read those keys, by class index and position, from the job's own dataset. No
image location comes from the request, so they cannot be used to read other objects or hosts.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from api.common.auth import PrincipalDep
from api.common.errors import error_responses
from api.control.deps import SessionDep, SettingsDep, StoreOpenerDep
from api.control.routes.adaptations import AdaptationId, job_id_of
from api.control.thumbnails import NotAnImage, thumbnail_jpeg
from services.config import Settings
from services.db.models import Job
from services.errors import ArtifactMissing
from services.jobs import repository
from services.schemas.jobs import MAX_CLASSES, SampleClass, SamplesPublic
from services.storage.uri import FileURI, parse_uri

router = APIRouter(prefix="/adaptations", tags=["adaptations"])

ClassIndex = Annotated[int, PathParam(ge=0, lt=MAX_CLASSES, description="The class's index in class_names")]
Position = Annotated[int, PathParam(ge=0, lt=1000, description="Which of the class's sample images")]
# Thumbnails of a finished job never change; the browser may keep them for the session.
THUMBNAIL_HEADERS = {"Cache-Control": "private, max-age=3600"}


def _samples(job: Job) -> dict[str, Any]:
    """The job's recorded sample, or ArtifactMissing (404) while it has none."""
    samples = (job.outcome or {}).get("samples")
    if not isinstance(samples, dict) or not isinstance(samples.get("keys"), list):
        raise ArtifactMissing(
            f"adaptation {job.id} has no sample images: they are recorded when a job succeeds"
        )
    return samples


def _sample_key(job: Job, class_index: int, position: int) -> str:
    """The dataset key recorded for this class and position; ArtifactMissing (404) when there is none."""
    keys = _samples(job)["keys"]
    if class_index >= len(keys) or not 0 <= position < len(keys[class_index]):
        raise ArtifactMissing(f"adaptation {job.id} has no sample image {position} of class {class_index}")
    return str(keys[class_index][position])


def _folder(prefix: str) -> str:
    """A key prefix as a folder (`imgs` does not hold `imgs2/...`), as the worker listed it."""
    return prefix if not prefix or prefix.endswith("/") else f"{prefix}/"


@router.get("/{adaptation_id}/samples", response_model=SamplesPublic, responses=error_responses(404))
def get_adaptation_samples(
    adaptation_id: AdaptationId, session: SessionDep, principal: PrincipalDep
) -> SamplesPublic:
    """List a few unlabeled images per class the served classifier predicted (thumbnails by position)."""
    job = repository.get_job(session, job_id_of(adaptation_id), tenant=principal.scope)
    samples = _samples(job)
    names = job.request.get("class_names", [])
    classes = [
        SampleClass(
            index=i,
            name=str(names[i]) if i < len(names) else str(i),
            images=len(keys),
            zero_shot=samples.get("zero_shot", [[]] * len(samples["keys"]))[i],
            confidence=samples.get("confidence", [[]] * len(samples["keys"]))[i],
        )
        for i, keys in enumerate(samples["keys"])
    ]
    return SamplesPublic(
        adaptation_id=job.id,
        classifier=str(samples.get("classifier", job.served or "")),
        per_class=int(samples.get("per_class", 0)),
        images=int(samples.get("images", 0)),
        classes=classes,
    )


def _read_image(job: Job, key: str, settings: Settings, opener: StoreOpenerDep) -> bytes:
    """The bytes of `key` in the job's dataset; ArtifactMissing if the key is not under the dataset."""
    location = parse_uri(job.request["dataset"]["uri"])
    if isinstance(location, FileURI) and settings.environment != "embedded":
        raise ArtifactMissing("sample images of a local dataset are shown only in the embedded mode")
    store, prefix = opener(location)
    if not key.startswith(_folder(prefix)):
        raise ArtifactMissing(f"adaptation {job.id}'s sample image is outside its dataset")
    return store.read_bytes(key, max_bytes=settings.limits.max_object_bytes)


@router.get(
    "/{adaptation_id}/samples/{class_index}/{position}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail"}}
    | error_responses(404, 422, 503),
)
def get_adaptation_sample_thumbnail(
    adaptation_id: AdaptationId,
    class_index: ClassIndex,
    position: Position,
    session: SessionDep,
    settings: SettingsDep,
    opener: StoreOpenerDep,
    principal: PrincipalDep,
) -> Response:
    """Get a JPEG thumbnail of one sample image of a class, read from the job's dataset."""
    job = repository.get_job(session, job_id_of(adaptation_id), tenant=principal.scope)
    key = _sample_key(job, class_index, position)
    data = _read_image(job, key, settings, opener)
    try:
        jpeg = thumbnail_jpeg(data, max_pixels=settings.limits.max_image_pixels)
    except NotAnImage as exc:
        raise ArtifactMissing(f"sample image {position} of class {class_index} is unreadable: {exc}") from exc
    return Response(jpeg, media_type="image/jpeg", headers=THUMBNAIL_HEADERS)
