"""Stage a job's unlabeled images from the object store into a local folder the trainer reads."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.config import LimitsSettings, Settings
from services.errors import EvalSetError, ObjectNotFound, ObjectTooLarge, StorageError, StorageUnavailable
from services.evalset import EvalItem, list_eval_items
from services.must.data import IMAGE_EXTENSIONS, ImageLoadError, SkipReport, decode_image
from services.must.errors import DatasetError
from services.storage.base import ObjectStore
from services.storage.object_store import open_store
from services.storage.retrying import RetryingStore

# Downloads are network-bound, so a few threads hide the per-object latency of S3.
DOWNLOAD_THREADS = 8
# Fetches in flight: a sliding window, so one slow object never leaves the other threads idle,
# and staging stops soon after `max_images`.
WINDOW = 4 * DOWNLOAD_THREADS


@dataclass
class StagedImages:
    """The local copies of the usable images, in listing order, their object keys, and what was skipped."""

    paths: list[Path]
    skipped: SkipReport
    # keys[i] is the key of paths[i] in the dataset's store (the dashboard shows samples from it).
    keys: list[str] = field(default_factory=list)


def local_name(key: str) -> str:
    """A flat, collision-free file name for an object key (keys may hold `/` or `..`)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{digest}{PurePosixPath(key).suffix.lower()}"


def folder_prefix(prefix: str) -> str:
    """Treat the URI's key prefix as a folder, so `s3://b/imgs` does not also match `imgs2/`."""
    return prefix if not prefix or prefix.endswith("/") else f"{prefix}/"


def _fetch(store: ObjectStore, key: str, target: Path, limits: LimitsSettings) -> str | None:
    """Copy one object to `target` if it decodes as an image; the skip reason otherwise."""
    if target.is_file():
        # Written only after validation by an earlier attempt of this job: reuse it on resume.
        return None
    try:
        data = store.read_bytes(key, max_bytes=limits.max_object_bytes)
        decode_image(data, max_bytes=limits.max_object_bytes, max_pixels=limits.max_image_pixels)
    except ObjectTooLarge:
        return "too_large"
    except ObjectNotFound:
        return "missing"
    except ImageLoadError as exc:
        return exc.reason
    tmp = target.with_name(f".{target.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return None


def image_keys(
    store: ObjectStore, prefix: str, skipped: SkipReport, on_first: Callable[[], None] | None = None
) -> Iterator[str]:
    """Stream the keys under `prefix` with an image extension, counting the others; `on_first` is
    called when the first image key is listed (the job's listing phase ends, staging starts)."""
    for info in store.iter_keys(prefix):
        if info.key.endswith("/"):
            continue
        if PurePosixPath(info.key).suffix.lower() in IMAGE_EXTENSIONS:
            if on_first is not None:
                on_first()
                on_first = None
            yield info.key
        else:
            skipped.add("not_an_image_extension", info.key)


def _stage(
    store: ObjectStore,
    prefix: str,
    out_dir: Path,
    settings: Settings,
    max_images: int | None,
    on_first: Callable[[], None] | None = None,
) -> StagedImages:
    """Fetch up to WINDOW objects at once while the listing streams; results are kept in listing order."""
    staged = StagedImages([], SkipReport())
    keys = image_keys(store, prefix, staged.skipped, on_first)
    pending: deque[tuple[str, Path, Future[str | None]]] = deque()
    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="stage") as pool:

        def submit_next() -> None:
            key = next(keys, None)
            if key is not None:
                target = out_dir / local_name(key)
                pending.append((key, target, pool.submit(_fetch, store, key, target, settings.limits)))

        for _ in range(WINDOW):
            submit_next()
        while pending and (max_images is None or len(staged.paths) < max_images):
            key, target, fetched = pending.popleft()
            reason = fetched.result()
            if reason is None:
                staged.paths.append(target)
                staged.keys.append(key)
            else:
                staged.skipped.add(reason, key)
            submit_next()
        for _, _, fetched in pending:
            fetched.cancel()
    return staged


def stage_images(
    uri: str,
    out_dir: Path,
    settings: Settings,
    *,
    max_images: int | None = None,
    on_first_image: Callable[[], None] | None = None,
) -> StagedImages:
    """Download the usable images under `uri` into `out_dir`; DatasetError if none are usable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        store, prefix = open_store(uri, settings)
        retrying = RetryingStore(store, settings.worker.storage_retry_seconds)
        staged = _stage(retrying, folder_prefix(prefix), out_dir, settings, max_images, on_first_image)
    except StorageUnavailable:
        raise  # still unreachable after the retries: not the dataset's fault, the job is requeued
    except StorageError as exc:
        raise DatasetError(f"cannot read the dataset at {uri}: {exc}") from exc
    if not staged.paths:
        detail = f"; skipped {staged.skipped.total}: {staged.skipped.counts}" if staged.skipped.total else ""
        raise DatasetError(f"no usable images found under {uri}{detail}")
    return staged


@dataclass
class LabelledImages:
    """The local copies of the eval set's images and their class indices, in the set's order."""

    paths: list[Path]
    labels: list[int]


_EVAL_PROBLEMS = {"missing": "missing", "too_large": "larger than the read limit"}


def _fetch_all(
    store: ObjectStore, items: Sequence[EvalItem], out_dir: Path, settings: Settings
) -> list[Path]:
    """Download every item; EvalSetError naming the first ones that are missing or not images."""
    targets = [out_dir / local_name(item.key) for item in items]
    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="stage-eval") as pool:
        keys = [item.key for item in items]
        reasons = list(
            pool.map(lambda key, target: _fetch(store, key, target, settings.limits), keys, targets)
        )
    bad = [(item.key, reason) for item, reason in zip(items, reasons, strict=True) if reason is not None]
    if bad:
        shown = ", ".join(f"{key!r} ({_EVAL_PROBLEMS.get(reason, reason)})" for key, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise EvalSetError(f"{len(bad)} image(s) of the eval set cannot be used: {shown}{more}")
    return targets


def stage_eval_set(
    uri: str, out_dir: Path, settings: Settings, class_names: Sequence[str], what: str = "eval set"
) -> LabelledImages:
    """Download the labelled set at `uri` (the eval set, or the few-label mode's `what`="labelled
    set"); DatasetError for unknown labels, missing or broken images and an empty set (never a
    silent skip: the scores, or the training, would not be the ones asked for)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(class_names)}
    try:
        store, key = open_store(uri, settings)
        retrying = RetryingStore(store, settings.worker.storage_retry_seconds)
        items = list_eval_items(retrying, key, uri, class_names)
        paths = _fetch_all(retrying, items, out_dir, settings)
    except StorageUnavailable:
        raise
    except EvalSetError as exc:
        raise DatasetError(f"{what}: {exc.message}") from exc
    except ObjectNotFound as exc:
        raise DatasetError(f"{what}: the manifest {uri} does not exist") from exc
    except StorageError as exc:
        raise DatasetError(f"cannot read the {what} at {uri}: {exc}") from exc
    return LabelledImages(paths, [index[item.label] for item in items])
