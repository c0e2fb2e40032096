"""Classify a stream of encoded images in batches: one JSON-ready record per image, in input order.

Shared by `must-predict DIR` and the worker's batch prediction over a bucket prefix. An image that
cannot be used gets a record with an `error` (a reason code and a message) instead of labels, so
one bad file never stops the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from services.must.data import ImageLoadError, decode_image
from services.must.inference import ImageClassifier

# Images per forward: large enough to keep a GPU busy, small enough for a laptop's memory.
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class BatchOptions:
    """How many labels each record lists, when to abstain, and the limits on each image."""

    top_k: int = 5
    min_probability: float | None = None
    batch_size: int = DEFAULT_BATCH
    max_bytes: int = 50_000_000
    max_pixels: int = 50_000_000


def error_record(name: str, reason: str, message: str) -> dict[str, Any]:
    """The record of an image that could not be classified."""
    return {"image": name, "error": {"reason": reason, "message": message}}


def label_record(name: str, top: list[dict[str, Any]], min_probability: float | None) -> dict[str, Any]:
    """The record of a classified image: its top labels, and the label unless it abstains."""
    abstained = min_probability is not None and top[0]["probability"] < min_probability
    return {
        "image": name,
        "label": None if abstained else top[0]["label"],
        "abstained": abstained,
        "predictions": top,
    }


def _decode(name: str, data: bytes | ImageLoadError, options: BatchOptions) -> Any:
    """A decoded image, or the error record of one that cannot be used."""
    if isinstance(data, ImageLoadError):
        return error_record(name, data.reason, str(data))
    try:
        return decode_image(data, max_bytes=options.max_bytes, max_pixels=options.max_pixels)
    except ImageLoadError as exc:
        return error_record(name, exc.reason, str(exc))


def _flush(
    classifier: ImageClassifier, pending: list[tuple[str, Any]], options: BatchOptions
) -> list[dict[str, Any]]:
    """Records for `pending` (name, image or error record), classifying the images in one forward."""
    images = [image for _, image in pending if not isinstance(image, dict)]
    tops = (
        iter(classifier.top_k(classifier.predict(images, options.batch_size), options.top_k))
        if images
        else None
    )
    records = []
    for name, image in pending:
        if isinstance(image, dict):
            records.append(image)
        else:
            assert tops is not None
            records.append(label_record(name, next(tops), options.min_probability))
    return records


@torch.no_grad()
def classify_stream(
    classifier: ImageClassifier,
    items: Iterable[tuple[str, bytes | ImageLoadError]],
    options: BatchOptions = BatchOptions(),
) -> Iterator[dict[str, Any]]:
    """One record per (name, bytes) item, in order; an item may also be an ImageLoadError (the
    caller could not read the file), which becomes that item's error record."""
    pending: list[tuple[str, Any]] = []
    for name, data in items:
        pending.append((name, _decode(name, data, options)))
        if len(pending) >= options.batch_size:
            yield from _flush(classifier, pending, options)
            pending = []
    if pending:
        yield from _flush(classifier, pending, options)
