"""Which storage locations a request may name, so that no input makes a service open its own files.

Outside the embedded mode a request names data only by `s3://` URI (read with the platform's S3
client, from the configured endpoint only), and model files by `s3://` URI or by a path under one
of the operator's `models.local_dirs`. No request may name the jobs' folder of the platform's
artifacts store (`<artifacts>/adaptations/`): it holds every tenant's checkpoints and
classifiers, which are reached only through job ids.
The control API checks a job's request at submit time and the worker checks it again before
opening anything, with its own settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from services.config import Settings
from services.errors import InvalidRequest
from services.storage.keys import ADAPTATIONS_FOLDER, join_key
from services.storage.uri import S3URI, FileURI, StorageURI, parse_uri

if TYPE_CHECKING:
    from services.schemas.jobs import AdaptationCreate


def _parsed(value: str, what: str) -> StorageURI:
    if "://" in value:
        return parse_uri(value)
    path = Path(value)
    if not path.is_absolute():
        raise InvalidRequest(f"{what} must be an s3:// URI, got {value!r}")
    return FileURI(path.resolve())


def _parts(key: str) -> list[str] | None:
    """A key's folder names without empty and `.` parts; None if it has a `..` (never allowed in)."""
    parts = [part for part in key.split("/") if part not in ("", ".")]
    return None if ".." in parts else parts


def _in_jobs_folder(uri: S3URI, artifacts: S3URI) -> bool:
    """Whether `uri` may reach the artifacts store's job folder (as folders: `a/b` is not in `a/bc`)."""
    if uri.bucket != artifacts.bucket:
        return False
    parts, folder = _parts(uri.prefix), _parts(join_key(artifacts.prefix, ADAPTATIONS_FOLDER))
    return parts is None or folder is None or parts[: len(folder)] == folder


def check_location(value: str, what: str, settings: Settings, *, model_file: bool = False) -> None:
    """InvalidRequest unless a request may name `value` as `what` under these settings."""
    location = _parsed(value, what)
    if isinstance(location, FileURI):
        if settings.environment == "embedded":
            return
        if model_file and any(location.path.is_relative_to(root) for root in settings.models.local_dirs):
            return
        allowed = (
            "an s3:// URI or a file under the operator's MUST_MODELS__LOCAL_DIRS"
            if model_file
            else "an s3:// URI"
        )
        raise InvalidRequest(f"{what} must be {allowed}: local files are accepted only in the embedded mode")
    artifacts = parse_uri(settings.storage.artifacts_uri)
    if isinstance(artifacts, S3URI) and _in_jobs_folder(location, artifacts):
        raise InvalidRequest(
            f"{what} points into the platform's artifacts store, which requests cannot read; "
            "use the adaptation's id to reach its classifier"
        )


def check_request_locations(request: AdaptationCreate, settings: Settings) -> None:
    """Check every location an adaptation request names (dataset, eval and labelled sets, model files)."""
    check_location(request.dataset.uri, "dataset.uri", settings)
    if request.eval is not None:
        check_location(request.eval.uri, "eval.uri", settings)
    if request.labelled is not None:
        check_location(request.labelled.uri, "labelled.uri", settings)
    for what, value in (
        ("model.checkpoint", request.model.checkpoint),
        ("model.config", request.model.config),
    ):
        if value is not None:
            check_location(value, what, settings, model_file=True)
