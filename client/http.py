"""A small Python client for the control API and the inference service (httpx, no torch).

    from client.http import MustClient

    with MustClient("http://localhost:8000", "http://localhost:8001", api_key="...") as must:
        job = must.adapt("s3://my-images/unlabeled/", ["cat", "dog"])
        job = must.wait(job.id)
        print(must.predict_files(job.id, ["photo.jpg"]))

Failures raise typed errors: `ServiceUnreachable` when a service cannot be reached, and an
`ApiError` subclass (`Unauthorized`, `NotFound`, `Conflict`, `RequestRejected`, `ServerError`)
carrying the service's own explanation when it answers with an error status.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from services.jobs.states import TERMINAL_STATUSES
from services.schemas.jobs import (
    AdaptationPublic,
    AdaptationsPage,
    ArtifactDownload,
    ArtifactFile,
    EvaluationReport,
    LogLine,
    LogsPage,
    MetricsPage,
)
from services.schemas.predictions import PredictionPublic

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8001"
CONTROL = "control API"
INFERENCE = "inference service"
# The files of an exported classifier (services.storage.keys.CLASSIFIER_FILES), the only names written.
CLASSIFIER_FILES = ("model.safetensors", "manifest.json")
# Files sent per POST /predict: enough to fill the service's micro-batches, small enough to stream.
UPLOAD_BATCH = 32


class MustClientError(Exception):
    """Base class of every error this client raises; `str()` is a message for people."""


class ServiceUnreachable(MustClientError):
    """The service did not answer: wrong URL, not started, or a network problem."""

    def __init__(self, service: str, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the {service} at {url}: {reason}")
        self.service, self.url, self.reason = service, url, reason


class ApiError(MustClientError):
    """The service answered with an error status; `detail` is its explanation."""

    def __init__(self, service: str, status: int, detail: str, error: str | None = None) -> None:
        super().__init__(f"the {service} answered {status}: {detail}")
        self.service, self.status, self.detail, self.error = service, status, detail, error


class Unauthorized(ApiError):
    """401: no API key, or one the service does not accept."""


class NotFound(ApiError):
    """404: no such adaptation, image or route."""


class Conflict(ApiError):
    """409: the job's state does not allow it (cancel a finished job, predict with an unfinished one)."""


class RequestRejected(ApiError):
    """400, 413, 415 or 422: the request itself must change."""


class ServerError(ApiError):
    """5xx: the service or something it depends on failed; retrying later may help."""


def _error_class(status: int) -> type[ApiError]:
    if status == 401:
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status >= 500:
        return ServerError
    return RequestRejected


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    """The service's explanation: `detail` (a string, or a list of field errors), else the raw text."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:500] or response.reason_phrase), None
    if not isinstance(body, dict):
        return str(body)[:500], None
    detail = body.get("detail", body)
    if isinstance(detail, list):
        parts = [
            f"{item.get('field', '?')}: {item.get('msg', item)}" for item in detail if isinstance(item, dict)
        ]
        detail = "; ".join(parts) or str(detail)
    return str(detail), body.get("error")


def check(service: str, response: httpx.Response) -> httpx.Response:
    """`response` if it succeeded, else the typed ApiError for its status."""
    if response.is_success:
        return response
    detail, error = _detail(response)
    raise _error_class(response.status_code)(service, response.status_code, detail, error)


class _Service:
    """One service's base URL and HTTP client; turns transport failures into ServiceUnreachable."""

    def __init__(self, name: str, url: str, headers: dict[str, str], timeout: float, **kwargs: Any) -> None:
        self.name, self.url = name, url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceUnreachable(
                self.name, self.url, f"no answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.name, self.url, str(exc) or type(exc).__name__) from exc
        return check(self.name, response)

    def download(self, url: str, target: Path, sha256: str) -> None:
        """GET `url` (a path of this service, or an absolute presigned URL, sent without the API key)
        into `target`, which appears only once its bytes match `sha256`."""
        presigned = url.startswith(("http://", "https://"))
        name = "object store" if presigned else self.name
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                # A presigned URL carries its own signature: an Authorization header would void it.
                client = httpx.Client(timeout=self.http.timeout) if presigned else self.http
                try:
                    with client.stream("GET", url) as response:
                        if not response.is_success:
                            response.read()
                        check(name, response)
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            fh.write(chunk)
                finally:
                    if presigned:
                        client.close()
            if digest.hexdigest() != sha256:
                raise MustClientError(
                    f"{target.name}: the downloaded bytes have sha256 {digest.hexdigest()}, expected {sha256}"
                )
            os.replace(tmp, target)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(name, url.split("?")[0], str(exc) or type(exc).__name__) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)


class MustClient:
    """Both services of one deployment, with one API key."""

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        inference_url: str = DEFAULT_INFERENCE_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        **httpx_options: Any,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.control = _Service(CONTROL, api_url, headers, timeout, **httpx_options)
        self.inference = _Service(INFERENCE, inference_url, headers, timeout, **httpx_options)

    def close(self) -> None:
        """Close both connection pools."""
        self.control.http.close()
        self.inference.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the control API -------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], *, idempotency_key: str | None = None) -> AdaptationPublic:
        """POST /adaptations with a full request body; the same `idempotency_key` never makes two jobs."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        response = self.control.request("POST", "/adaptations", json=request, headers=headers)
        return AdaptationPublic.model_validate(response.json())

    def adapt(
        self,
        dataset_uri: str,
        class_names: Sequence[str],
        *,
        model: dict[str, str] | None = None,
        templates: Sequence[str] | None = None,
        hparams: dict[str, Any] | None = None,
        max_images: int | None = None,
        eval_uri: str | None = None,
        class_descriptions: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        method: str | None = None,
        warm_start: str | None = None,
    ) -> AdaptationPublic:
        """Submit an adaptation of `model` (the service's default if None) to the images at `dataset_uri`;
        `method` "instant" for the training-free method, `warm_start` "instant" to start MUST from it."""
        dataset: dict[str, Any] = {"uri": dataset_uri}
        if max_images is not None:
            dataset["max_images"] = max_images
        optional = {
            "model": model,
            "templates": templates,
            "hparams": hparams,
            "class_descriptions": class_descriptions,
            "name": name,
            "method": method,
            "warm_start": warm_start,
        }
        optional["tags"] = list(tags) if tags else None
        request: dict[str, Any] = {"class_names": list(class_names), "dataset": dataset}
        request |= {key: value for key, value in optional.items() if value is not None}
        if eval_uri is not None:
            request["eval"] = {"uri": eval_uri}
        return self.submit(request, idempotency_key=idempotency_key)

    def get(self, adaptation_id: str) -> AdaptationPublic:
        """GET /adaptations/{id}."""
        response = self.control.request("GET", f"/adaptations/{adaptation_id}")
        return AdaptationPublic.model_validate(response.json())

    def list_adaptations(
        self,
        *,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        name: str | None = None,
        tag: str | None = None,
    ) -> AdaptationsPage:
        """GET /adaptations, newest first, filtered by status, exact name and tag when given."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        filters = {"status": status, "name": name, "tag": tag}
        params |= {key: value for key, value in filters.items() if value}
        response = self.control.request("GET", "/adaptations", params=params)
        return AdaptationsPage.model_validate(response.json())

    def cancel(self, adaptation_id: str) -> AdaptationPublic:
        """POST /adaptations/{id}/cancel."""
        response = self.control.request("POST", f"/adaptations/{adaptation_id}/cancel")
        return AdaptationPublic.model_validate(response.json())

    def delete(self, adaptation_id: str) -> None:
        """DELETE /adaptations/{id}: the job, its classifier, checkpoints and metrics (NotFound if gone;
        Conflict while it runs: cancel it and wait for it to stop first)."""
        self.control.request("DELETE", f"/adaptations/{adaptation_id}")

    def artifact(self, adaptation_id: str) -> ArtifactDownload:
        """GET /adaptations/{id}/artifact: the classifier's files, their sizes, sha256 and download URLs."""
        response = self.control.request("GET", f"/adaptations/{adaptation_id}/artifact")
        return ArtifactDownload.model_validate(response.json())

    def download(self, adaptation_id: str, folder: Path | str, *, via_api: bool = False) -> ArtifactDownload:
        """Download a succeeded job's classifier into `folder` (model.safetensors, manifest.json), each
        file checked against its sha256; `via_api` streams through the control API instead of presigned
        URLs (for an object store your machine cannot reach)."""
        info = self.artifact(adaptation_id)
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        for file in info.files:
            if file.name not in CLASSIFIER_FILES:  # never write where a (mistaken) server says
                raise MustClientError(f"the service named an unexpected classifier file {file.name!r}")
            self.control.download(
                self._file_url(info.adaptation_id, file, via_api), target / file.name, file.sha256
            )
        return info

    @staticmethod
    def _file_url(adaptation_id: str, file: ArtifactFile, via_api: bool) -> str:
        return f"/adaptations/{adaptation_id}/artifact/{file.name}" if via_api else file.url

    def metrics(self, adaptation_id: str, *, since_step: int = 0, limit: int = 1000) -> MetricsPage:
        """GET /adaptations/{id}/metrics: the job's metric history."""
        params = {"since_step": since_step, "limit": limit}
        response = self.control.request("GET", f"/adaptations/{adaptation_id}/metrics", params=params)
        return MetricsPage.model_validate(response.json())

    def evaluation(self, adaptation_id: str) -> EvaluationReport | None:
        """The job's scores on its labelled eval set (None: no eval set, or the job has not succeeded)."""
        return self.get(adaptation_id).evaluation

    def logs_page(self, adaptation_id: str, *, after: int = 0, limit: int = 1000) -> LogsPage:
        """GET /adaptations/{id}/logs: one page of the worker's lines for the job."""
        params = {"after": after, "limit": limit}
        response = self.control.request("GET", f"/adaptations/{adaptation_id}/logs", params=params)
        return LogsPage.model_validate(response.json())

    def logs(self, adaptation_id: str, *, after: int = 0) -> list[LogLine]:
        """Every worker log line of the job after line id `after`, oldest first (all pages)."""
        lines: list[LogLine] = []
        while True:
            page = self.logs_page(adaptation_id, after=after)
            lines += page.items
            if not page.items:
                return lines
            after = page.items[-1].id

    def wait(
        self,
        adaptation_id: str,
        *,
        poll_seconds: float = 2.0,
        timeout: float | None = None,
        on_update: Callable[[AdaptationPublic], None] | None = None,
    ) -> AdaptationPublic:
        """Poll the job until it succeeded, failed or was cancelled; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(adaptation_id)
            if on_update is not None:
                on_update(job)
            if job.status in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"adaptation {adaptation_id} is still {job.status.value} after {timeout} s"
                )
            time.sleep(poll_seconds)

    # -- the inference service -------------------------------------------------------------------

    def predict_url(
        self,
        adaptation_id: str | None,
        image_url: str,
        *,
        top_k: int = 5,
        zero_shot: dict[str, str] | None = None,
        min_probability: float | None = None,
    ) -> dict[str, Any]:
        """GET /predict: classify one stored image (s3://...) with an adapted classifier, or with the
        zero-shot baseline that `zero_shot` describes (arch, pretrained, checkpoint, config,
        class_names, templates: /predict's form fields) when `adaptation_id` is None."""
        params = {"image_url": image_url} | _model_fields(adaptation_id, zero_shot, top_k, min_probability)
        response = self.inference.request("GET", "/predict", params=params)
        result: dict[str, Any] = response.json()
        return result

    def predict_files(
        self,
        adaptation_id: str | None,
        files: Iterable[Path | str | tuple[str, bytes]],
        *,
        top_k: int = 5,
        zero_shot: dict[str, str] | None = None,
        min_probability: float | None = None,
    ) -> list[dict[str, Any]]:
        """POST /predict: classify local files (paths, or (name, bytes) pairs), in order, in batches
        (with the zero-shot baseline `zero_shot` describes when `adaptation_id` is None)."""
        fields = _model_fields(adaptation_id, zero_shot, top_k, min_probability)
        results: list[dict[str, Any]] = []
        batch: list[tuple[str, bytes]] = []
        for item in files:
            batch.append(item if isinstance(item, tuple) else (Path(item).name, Path(item).read_bytes()))
            if len(batch) == UPLOAD_BATCH:
                results += self._predict_batch(fields, batch)
                batch = []
        if batch:
            results += self._predict_batch(fields, batch)
        return results

    def _predict_batch(self, fields: dict[str, str], batch: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        uploads = [("files", (name, data)) for name, data in batch]
        response = self.inference.request("POST", "/predict", data=fields, files=uploads)
        results: list[dict[str, Any]] = response.json()["results"]
        return results

    # -- batch prediction runs (control API) -------------------------------------------------------

    def start_prediction(
        self,
        adaptation_id: str,
        source: str,
        *,
        top_k: int = 5,
        min_probability: float | None = None,
        max_images: int | None = None,
    ) -> PredictionPublic:
        """POST /predictions: queue a run classifying every image under `source` (s3://bucket/prefix/)."""
        body: dict[str, Any] = {"adaptation_id": adaptation_id, "source": source, "top_k": top_k}
        body |= {"min_probability": min_probability, "max_images": max_images}
        response = self.control.request("POST", "/predictions", json=body)
        return PredictionPublic.model_validate(response.json())

    def get_prediction(self, run_id: str) -> PredictionPublic:
        """GET /predictions/{id}."""
        return PredictionPublic.model_validate(self.control.request("GET", f"/predictions/{run_id}").json())

    def wait_prediction(
        self,
        run_id: str,
        *,
        poll_seconds: float = 2.0,
        on_update: Callable[[PredictionPublic], None] | None = None,
    ) -> PredictionPublic:
        """Poll the run until it succeeded or failed."""
        while True:
            run = self.get_prediction(run_id)
            if on_update is not None:
                on_update(run)
            if run.status in TERMINAL_STATUSES:
                return run
            time.sleep(poll_seconds)

    def download_prediction_results(self, run: PredictionPublic, target: Path | str) -> Path:
        """Save a succeeded run's JSONL at `target` (checked against its sha256 before it appears)."""
        if run.results_url is None or run.results_sha256 is None:
            raise MustClientError(f"prediction run {run.id} is {run.status.value}: it has no results")
        path = Path(target)
        self.control.download(run.results_url, path, run.results_sha256)
        return path

    # -- both ------------------------------------------------------------------------------------

    def ready(self) -> dict[str, dict[str, Any]]:
        """GET /readyz of both services: {"control API": {...}, "inference service": {...}}."""
        answers = {}
        for service in (self.control, self.inference):
            try:
                answers[service.name] = service.request("GET", "/readyz").json()
            except ServerError as exc:  # 503 still carries which component is down
                answers[service.name] = {"status": "unavailable", "detail": exc.detail}
        return answers


def _model_fields(
    adaptation_id: str | None, zero_shot: dict[str, str] | None, top_k: int, min_probability: float | None
) -> dict[str, str]:
    """/predict's form or query fields naming the classifier: an adaptation, or a zero-shot baseline."""
    if (adaptation_id is None) == (zero_shot is None):
        raise MustClientError("name either an adaptation id or a zero-shot model, not both or neither")
    fields = {"adaptation_id": adaptation_id} if adaptation_id is not None else dict(zero_shot or {})
    fields["top_k"] = str(top_k)
    if min_probability is not None:
        fields["min_probability"] = str(min_probability)
    return {key: value for key, value in fields.items() if value is not None}
