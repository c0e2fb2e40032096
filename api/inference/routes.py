"""`/predict`: thin routes that decode the request, call the predictor and encode the answer."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field

from api.common.errors import error_responses
from api.common.metrics import PredictionSource, record_predictions
from api.inference.deps import ImageReader, ImageReaderDep, PredictorDep
from api.inference.predictor import Arrival, Predictor, ServedModel, ZeroShotRequest
from services.errors import InvalidRequest
from services.must.loading import ModelSpec

router = APIRouter(tags=["predict"])

MAX_TOP_K = 1000
_MODEL_KEYS = ("arch", "pretrained", "checkpoint", "config")
_ERRORS = error_responses(404, 409, 413, 422, 503)


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


class PredictResponse(BaseModel):
    """The top labels of one image named by URL."""

    adaptation_id: str | None
    artifact_sha256: str | None
    model: dict[str, Any]
    predictions: list[Prediction]


class FileResult(BaseModel):
    """The top labels of one uploaded file."""

    filename: str
    predictions: list[Prediction]


class BatchPredictResponse(BaseModel):
    """The top labels of each uploaded file, in upload order."""

    adaptation_id: str | None
    artifact_sha256: str | None
    model: dict[str, Any]
    results: list[FileResult]


def _json_or(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None


def _spec(fields: ModelFields) -> ModelSpec | None:
    values: Any = {key: getattr(fields, key) for key in _MODEL_KEYS}
    if fields.model is not None:
        values = _json_or(fields.model, "model")
        if not isinstance(values, dict) or set(values) - set(_MODEL_KEYS):
            raise InvalidRequest(f"model must be a JSON object with keys among {', '.join(_MODEL_KEYS)}")
    if not any(values.get(key) for key in _MODEL_KEYS):
        return None
    return ModelSpec(**{key: values.get(key) for key in _MODEL_KEYS})


def _names(text: str) -> list[str]:
    if text.lstrip().startswith("["):
        names = _json_or(text, "class_names")
        if not isinstance(names, list):
            raise InvalidRequest("class_names must be comma-separated or a JSON list")
        return [str(name) for name in names]
    return [name.strip() for name in text.split(",")]


def zero_shot_request(fields: ModelFields, *, local_files_allowed: bool = True) -> ZeroShotRequest:
    """The zero-shot baseline the fields describe; InvalidRequest when they name no classifier."""
    spec = _spec(fields)
    if spec is None or not fields.class_names:
        raise InvalidRequest("give adaptation_id, or a model and class_names for the zero-shot baseline")
    local_files = [
        f for f in (spec.checkpoint, spec.config) if isinstance(f, str) and not f.startswith("s3://")
    ]
    if local_files and not local_files_allowed:
        raise InvalidRequest(
            "local zero-shot checkpoint and config files are served only in the embedded mode; "
            "give s3:// URIs, an architecture and pretrained tag, or adapt and use adaptation_id"
        )
    templates = None
    if fields.templates is not None:
        parsed = _json_or(fields.templates, "templates")
        if not isinstance(parsed, list):
            raise InvalidRequest("templates must be a JSON list of strings")
        templates = tuple(str(t) for t in parsed)
    return ZeroShotRequest(spec, tuple(_names(fields.class_names)), templates)


async def _served(predictor: Predictor, reader: ImageReader, fields: ModelFields) -> ServedModel:
    if fields.adaptation_id:
        return await predictor.adapted(fields.adaptation_id)
    request = zero_shot_request(fields, local_files_allowed=reader.local_files_allowed)
    return await predictor.zero_shot(request)


async def _classify(
    predictor: Predictor,
    served: ServedModel,
    images: list[tuple[str, bytes]],
    top_k: int,
    arrival: Arrival,
) -> list[list[Prediction]]:
    pixels = await predictor.decode(served, images)
    probs = await predictor.predict(served, pixels, arrival)
    return [[Prediction(**p) for p in row] for row in predictor.encode(served, probs, top_k)]


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
    image_url: Annotated[str, Query(min_length=1, description="s3://bucket/key or file:///path")],
    fields: Annotated[ModelFields, Query()],
) -> PredictResponse:
    """Classify one stored image with an adapted classifier or the zero-shot baseline."""
    with predictor.arriving() as arrival:
        served = await _served(predictor, reader, fields)
        data = await asyncio.to_thread(reader.read, image_url)
        (predictions,) = await _classify(predictor, served, [(image_url, data)], fields.top_k, arrival)
    record_predictions(request, _source(fields), 1)
    return PredictResponse(**_about(served), predictions=predictions)


@router.post("/predict", response_model=BatchPredictResponse, responses=_ERRORS, status_code=HTTPStatus.OK)
async def predict_files(
    request: Request,
    predictor: PredictorDep,
    reader: ImageReaderDep,
    files: Annotated[list[UploadFile], File(description="One or more images")],
    fields: Annotated[ModelFields, Form()],
) -> BatchPredictResponse:
    """Classify uploaded images with an adapted classifier or the zero-shot baseline."""
    with predictor.arriving() as arrival:
        served = await _served(predictor, reader, fields)
        limit = predictor.max_image_bytes
        # Reading one byte past the limit is enough for decode_image to refuse the file as too large.
        images = [
            (upload.filename or f"file-{i}", await upload.read(limit + 1)) for i, upload in enumerate(files)
        ]
        predictions = await _classify(predictor, served, images, fields.top_k, arrival)
    record_predictions(request, _source(fields), len(images))
    results = [
        FileResult(filename=name, predictions=p) for (name, _), p in zip(images, predictions, strict=True)
    ]
    return BatchPredictResponse(**_about(served), results=results)
