"""`/predict`: thin routes that decode the request, call the predictor and encode the answer."""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.routing import Route

from api.common.auth import PrincipalDep, authenticate
from api.common.errors import error_responses
from api.common.metrics import PredictionSource, record_predictions
from api.inference.batching import Arrival
from api.inference.deps import ImageReader, ImageReaderDep, PredictorDep
from api.inference.errors import ImageRejected
from api.inference.predictor import Predictor, Ranked, ServedModel, ZeroShotRequest
from api.inference.uploads import Form, parse_form
from services.auth.keys import Principal
from services.config import Settings
from services.errors import InvalidRequest
from services.locations import check_location
from services.must.loading import ModelSpec
from services.schemas.jobs import MODEL_NAME_PATTERN

router = APIRouter(tags=["predict"])

MAX_TOP_K = 1000
_MODEL_KEYS = ("arch", "pretrained", "checkpoint", "config")
_ERRORS = error_responses(404, 409, 413, 422, 503)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


class Prediction(BaseModel):
    """One label and its probability."""

    label: str
    probability: float


class ModelFields(BaseModel):
    """Which classifier to use: an adaptation, or a CLIP and class list for the zero-shot baseline."""

    adaptation_id: str | None = Field(default=None, description="A succeeded adaptation's id")
    model: str | None = Field(
        default=None, description='JSON, e.g. {"arch": "ViT-B-32", "pretrained": "openai"}'
    )
    arch: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    config: str | None = None
    class_names: str | None = Field(default=None, description="Comma-separated (or a JSON list)")
    templates: str | None = Field(default=None, description='A JSON list of prompts, each with one "{}"')
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    min_probability: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Abstain (label null, abstained true) when the top probability is below this; "
        "omitted: the adaptation's own min_probability, if its job set one",
    )


class PredictResponse(BaseModel):
    """The top labels of one image named by URL."""

    adaptation_id: str | None
    artifact_sha256: str | None
    model: dict[str, Any]
    min_probability: float | None = Field(description="The abstain threshold applied (null: none)")
    label: str | None = Field(description="The top label; null when the classifier abstained")
    abstained: bool = Field(description="The top probability is below min_probability")
    predictions: list[Prediction]


class FileError(BaseModel):
    """Why one uploaded file could not be classified."""

    reason: str = Field(description="not_an_image, unreadable, too_large or too_many_pixels")
    message: str


class FileResult(BaseModel):
    """The top labels of one uploaded file, or why it could not be used."""

    filename: str
    label: str | None = Field(default=None, description="The top label; null if abstained or rejected")
    abstained: bool = False
    predictions: list[Prediction] = Field(default_factory=list)
    error: FileError | None = Field(default=None, description="Set when this file was not usable")


class BatchPredictResponse(BaseModel):
    """The top labels of each uploaded file, in upload order; a file that is not a usable image gets
    an `error` instead (the request fails only when no file is usable)."""

    adaptation_id: str | None
    artifact_sha256: str | None
    model: dict[str, Any]
    min_probability: float | None = Field(description="The abstain threshold applied (null: none)")
    results: list[FileResult]


def _json_or(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None


def _spec(fields: ModelFields, settings: Settings) -> ModelSpec | None:
    values: Any = {key: getattr(fields, key) for key in _MODEL_KEYS}
    if fields.model:  # an empty field is an absent one
        values = _json_or(fields.model, "model")
        if not isinstance(values, dict) or set(values) - set(_MODEL_KEYS):
            raise InvalidRequest(f"model must be a JSON object with keys among {', '.join(_MODEL_KEYS)}")
    if not any(values.get(key) for key in _MODEL_KEYS):
        return None
    if not all(value is None or isinstance(value, str) for value in values.values()):
        raise InvalidRequest(f"the model fields {', '.join(_MODEL_KEYS)} are strings")
    for key in ("arch", "pretrained"):
        if values.get(key) and not _MODEL_NAME.match(values[key]):
            raise InvalidRequest(
                f"model {key} {values[key][:100]!r} is not an open_clip name (letters, digits, '_', '.', '-')"
            )
    for key in ("checkpoint", "config"):
        if values.get(key):
            check_location(values[key], f"model {key}", settings, model_file=True)
    return ModelSpec(
        **{key: values.get(key) or None for key in _MODEL_KEYS},
        allow_download=settings.models.allow_downloads,
        download_timeout=settings.models.download_timeout_seconds,
    )


def _names(text: str) -> list[str]:
    if text.lstrip().startswith("["):
        names = _json_or(text, "class_names")
        if not isinstance(names, list):
            raise InvalidRequest("class_names must be comma-separated or a JSON list")
        return [str(name) for name in names]
    return [name.strip() for name in text.split(",")]


def zero_shot_request(fields: ModelFields, settings: Settings) -> ZeroShotRequest:
    """The zero-shot baseline the fields describe; InvalidRequest when they name no classifier.

    Outside the embedded mode its model files must be s3:// URIs (or files under the operator's
    `models.local_dirs`), and a pretrained tag is only a name, never a path.
    """
    spec = _spec(fields, settings)
    if spec is None or not fields.class_names:
        raise InvalidRequest("give adaptation_id, or a model and class_names for the zero-shot baseline")
    templates = None
    if fields.templates is not None:
        parsed = _json_or(fields.templates, "templates")
        if not isinstance(parsed, list):
            raise InvalidRequest("templates must be a JSON list of strings")
        templates = tuple(str(t) for t in parsed)
    return ZeroShotRequest(spec, tuple(_names(fields.class_names)), templates)


async def _served(
    predictor: Predictor, reader: ImageReader, fields: ModelFields, principal: Principal
) -> ServedModel:
    if fields.adaptation_id:
        return await predictor.adapted(fields.adaptation_id, principal.scope)
    request = zero_shot_request(fields, reader.settings)
    return await predictor.zero_shot(request)


async def _classify(
    predictor: Predictor,
    served: ServedModel,
    images: list[tuple[str, bytes]],
    top_k: int,
    arrival: Arrival,
) -> list[list[Prediction] | ImageRejected]:
    """Each image's top labels, or its rejection; raises when no image is usable."""
    outcomes = await predictor.classify(served, images, top_k, arrival)
    return [o if isinstance(o, ImageRejected) else [Prediction(**p) for p in o] for o in outcomes]


def _threshold(fields: ModelFields, served: ServedModel) -> float | None:
    return fields.min_probability if fields.min_probability is not None else served.min_probability


def _label(top: str, probability: float, threshold: float | None) -> tuple[str | None, bool]:
    """The top label, or (None, True) when its probability is below the abstain threshold."""
    if threshold is not None and probability < threshold:
        return None, True
    return top, False


def _source(fields: ModelFields) -> PredictionSource:
    return "adaptation" if fields.adaptation_id else "zero_shot"


def _about(served: ServedModel) -> dict[str, Any]:
    return {
        "adaptation_id": served.adaptation_id,
        "artifact_sha256": served.artifact_sha256,
        "model": served.description,
    }


@router.get("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict_url(
    request: Request,
    predictor: PredictorDep,
    reader: ImageReaderDep,
    principal: PrincipalDep,
    image_url: Annotated[
        str, Query(min_length=1, max_length=2048, description="s3://bucket/key (file:///path when embedded)")
    ],
    fields: Annotated[ModelFields, Query()],
) -> PredictResponse:
    """Classify one stored image with an adapted classifier or the zero-shot baseline."""
    with predictor.arriving() as arrival:
        served = await _served(predictor, reader, fields, principal)
        data = await asyncio.to_thread(reader.read, image_url)
        (predictions,) = await _classify(predictor, served, [(image_url, data)], fields.top_k, arrival)
    assert not isinstance(predictions, ImageRejected)  # a lone unusable image raises instead
    record_predictions(request, _source(fields), 1)
    threshold = _threshold(fields, served)
    label, abstained = _label(predictions[0].label, predictions[0].probability, threshold)
    return PredictResponse(
        **_about(served),
        min_probability=threshold,
        label=label,
        abstained=abstained,
        predictions=predictions,
    )


def _upload_schema() -> dict[str, Any]:
    """The multipart body's OpenAPI schema: the `ModelFields` as text fields, plus the files."""
    schema = ModelFields.model_json_schema()
    schema["properties"] = {
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "One or more images",
        },
        **schema["properties"],
    }
    schema["required"] = ["files"]
    schema["title"] = "PredictUpload"
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _form_fields(form: Form) -> ModelFields:
    """The text fields as `ModelFields`: 422 for an unknown name or an invalid value."""
    unknown = sorted(set(form.fields) - set(ModelFields.model_fields))
    if unknown:
        raise InvalidRequest(
            f"unknown form field(s) {', '.join(repr(name[:64]) for name in unknown[:5])}; "
            f"known: files, {', '.join(ModelFields.model_fields)}"
        )
    misplaced = [name for name, _, _ in form.files if name != "files"]
    if misplaced:
        raise InvalidRequest(f"upload images as parts named 'files', not {misplaced[0][:64]!r}")
    if not form.files:
        raise RequestValidationError([{"loc": ("body", "files"), "msg": "Field required", "type": "missing"}])
    try:
        return ModelFields.model_validate(form.fields)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


def _batch_json(
    served: ServedModel, threshold: float | None, names: list[str], outcomes: list[Ranked | ImageRejected]
) -> bytes:
    """The `BatchPredictResponse` JSON, built from plain values: a model per label would cost more than
    the forward of a small image."""
    results = []
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, ImageRejected):
            error = {"reason": outcome.reason, "message": outcome.detail}
            results.append(
                {"filename": name, "label": None, "abstained": False, "predictions": [], "error": error}
            )
            continue
        label, abstained = _label(outcome[0]["label"], outcome[0]["probability"], threshold)
        results.append(
            {"filename": name, "label": label, "abstained": abstained, "predictions": outcome, "error": None}
        )
    body = {**_about(served), "min_probability": threshold, "results": results}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def classify_uploads(request: Request, principal: Principal) -> Response:
    """Classify the images uploaded to POST /predict (see `predict_files`)."""
    predictor: Predictor = request.app.state.predictor
    reader: ImageReader = request.app.state.image_reader
    with predictor.arriving() as arrival:
        form = parse_form(
            await request.body(),
            request.headers.get("content-type"),
            max_files=reader.settings.limits.max_files_per_request,
        )
        fields = _form_fields(form)
        served = await _served(predictor, reader, fields, principal)
        names = [filename or f"file-{i}" for i, (_, filename, _) in enumerate(form.files)]
        images = [(name, data) for name, (_, _, data) in zip(names, form.files, strict=True)]
        del form
        outcomes = await predictor.classify(served, images, fields.top_k, arrival)
    threshold = _threshold(fields, served)
    used = sum(not isinstance(outcome, ImageRejected) for outcome in outcomes)
    record_predictions(request, _source(fields), used)
    return Response(_batch_json(served, threshold, names, outcomes), media_type="application/json")


@router.post(
    "/predict",
    response_model=BatchPredictResponse,
    responses=_ERRORS,
    status_code=HTTPStatus.OK,
    openapi_extra=_upload_schema(),
)
async def predict_files(request: Request, principal: PrincipalDep) -> Response:
    """Classify uploaded images with an adapted classifier or the zero-shot baseline."""
    return await classify_uploads(request, principal)


async def _predict_files_fast(request: Request) -> Response:
    # FastAPI's router records only its own routes in the scope; the metrics label requests by it.
    request.scope["route"] = FAST_PREDICT
    return await classify_uploads(request, await authenticate(request))


# POST /predict as a plain Starlette route, placed before every other route (`create_app`):
# FastAPI's dependency solving and route matching cost more than the forward of a small image.
# It reads the key as `predict_files` does; that route stays in the OpenAPI document.
FAST_PREDICT = Route("/predict", _predict_files_fast, methods=["POST"], include_in_schema=False)
