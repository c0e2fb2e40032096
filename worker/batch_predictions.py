"""Batch prediction: a succeeded adaptation classifies every image under a prefix into one JSONL file.

Images are read a window at a time (threads hide S3's per-object latency) and classified in
batches as they arrive, so memory stays bounded whatever the prefix holds. The JSONL is written
locally and uploaded to the artifacts store under the adaptation's folder when complete: a run
that dies leaves no partial results file. Its worker holds the run's lease (renewed from a
thread); when the worker dies the reconciler requeues the run and it starts over elsewhere.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.db.models import Job
from services.errors import DomainError, ObjectNotFound, ObjectTooLarge, StorageError
from services.jobs import predictions, repository
from services.jobs.states import JobStatus
from services.locations import check_location
from services.must.adapt import default_device
from services.must.batch import BatchOptions, classify_stream
from services.must.checkpoint import sha256_file
from services.must.data import ImageLoadError, SkipReport
from services.must.errors import MustError
from services.must.export import MANIFEST, WEIGHTS, load_classifier
from services.must.inference import ImageClassifier
from services.schemas.predictions import PredictionCreate
from services.storage import keys
from services.storage.base import ObjectStore
from services.storage.object_store import open_store
from services.storage.retrying import RetryingStore
from worker.dataset import DOWNLOAD_THREADS, WINDOW, folder_prefix, image_keys
from worker.progress import renewing

log = logging.getLogger(__name__)


class PredictionFailed(Exception):
    """The run cannot complete for a reason its owner can fix; the message says which."""


class LeaseLost(Exception):
    """Another worker took the run over (this one was thought dead): stop without writing anything."""


@dataclass
class Counts:
    done: int = 0
    failed: int = 0
    abstained: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += "error" in record
        self.abstained += bool(record.get("abstained"))


def _read(store: ObjectStore, key: str, max_bytes: int) -> bytes | ImageLoadError:
    try:
        return store.read_bytes(key, max_bytes=max_bytes)
    except ObjectTooLarge:
        return ImageLoadError("too_large", f"larger than {max_bytes} bytes")
    except ObjectNotFound:
        return ImageLoadError("missing", "the object was deleted while the run read the prefix")


def read_images(
    store: ObjectStore, prefix: str, max_bytes: int, max_images: int | None
) -> Iterator[tuple[str, bytes | ImageLoadError]]:
    """(key, bytes or why not) of each image under `prefix`, in listing order, WINDOW reads in flight."""
    listed = image_keys(store, prefix, SkipReport())
    pending: deque[tuple[str, Future[bytes | ImageLoadError]]] = deque()
    taken = 0
    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="predict-read") as pool:

        def submit_next() -> None:
            nonlocal taken
            key = next(listed, None) if max_images is None or taken < max_images else None
            if key is not None:
                taken += 1
                pending.append((key, pool.submit(_read, store, key, max_bytes)))

        for _ in range(WINDOW):
            submit_next()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
            submit_next()


def _load(job: Job, store: ObjectStore, prefix: str, folder: Path, device: torch.device) -> ImageClassifier:
    """Download the adaptation's classifier and load it, checking the weights against the job's sha256."""
    for name, key in (
        (WEIGHTS, keys.classifier_weights_key(job.id)),
        (MANIFEST, keys.classifier_manifest_key(job.id)),
    ):
        store.download_file(keys.join_key(prefix, key), folder / name)
    if sha256_file(folder / WEIGHTS) != job.artifact_sha256:
        raise PredictionFailed(f"the stored classifier of adaptation {job.id} does not match its sha256")
    return load_classifier(folder, device=device)


def _options(request: PredictionCreate, job: Job, settings: Settings) -> BatchOptions:
    threshold = request.min_probability
    if threshold is None:
        threshold = (job.request or {}).get("min_probability")
    limits = settings.limits
    return BatchOptions(
        top_k=request.top_k,
        min_probability=threshold,
        max_bytes=limits.max_object_bytes,
        max_pixels=limits.max_image_pixels,
    )


def _succeeded_job(session: Session, job_id: str) -> Job:
    job = repository.get_job(session, job_id)
    if job.status != JobStatus.SUCCEEDED or not job.artifact_sha256:
        raise PredictionFailed(f"adaptation {job_id} is {job.status.value}; only a succeeded one can predict")
    return job


@dataclass
class _Run:
    """What the steps of one run share: its id, the database, this worker's id and the lease flag."""

    run_id: str
    session_factory: sessionmaker[Session]
    settings: Settings
    owner: str
    lost: threading.Event
    last_report: float = 0.0

    def report(self, counts: Counts) -> None:
        """Write the counts to the run's row at most every `worker.progress_every_seconds`."""
        if self.lost.is_set():
            raise LeaseLost(self.run_id)
        if time.monotonic() - self.last_report < self.settings.worker.progress_every_seconds:
            return
        self.last_report = time.monotonic()
        with self.session_factory() as session:
            predictions.record_progress(
                session,
                self.run_id,
                owner=self.owner,
                done=counts.done,
                failed=counts.failed,
                abstained=counts.abstained,
            )


def _classify_to_file(
    classifier: ImageClassifier,
    items: Iterator[tuple[str, bytes | ImageLoadError]],
    options: BatchOptions,
    out: Path,
    progress: Callable[[Counts], None],
) -> Counts:
    counts = Counts()
    with out.open("w", encoding="utf-8") as lines:
        for record in classify_stream(classifier, items, options):
            counts.add(record)
            lines.write(json.dumps({"key": record.pop("image")} | record) + "\n")
            progress(counts)
    if counts.done == 0:
        raise PredictionFailed("no images found under the source prefix (by file extension)")
    return counts


def _run(run: _Run, device: torch.device) -> None:
    settings = run.settings
    with run.session_factory() as session:
        row = predictions.get_run(session, run.run_id)
        request = PredictionCreate.model_validate(row.request)
        job = _succeeded_job(session, row.job_id)
    # Checked again here, with the worker's own settings, before anything is opened.
    check_location(request.source, "source", settings)
    artifacts, artifacts_prefix = open_store(settings.storage.artifacts_uri, settings)
    retry_s = settings.worker.storage_retry_seconds
    artifacts = RetryingStore(artifacts, retry_s)
    source, source_prefix = open_store(request.source, settings)
    source = RetryingStore(source, retry_s)
    with tempfile.TemporaryDirectory(prefix="must-predict-") as tmp:
        folder = Path(tmp)
        (folder / "classifier").mkdir()
        classifier = _load(job, artifacts, artifacts_prefix, folder / "classifier", device)
        options = _options(request, job, settings)
        items = read_images(source, folder_prefix(source_prefix), options.max_bytes, request.max_images)
        results = folder / "results.jsonl"
        counts = _classify_to_file(classifier, items, options, results, run.report)
        if run.lost.is_set():
            raise LeaseLost(run.run_id)
        key = keys.join_key(artifacts_prefix, keys.prediction_results_key(job.id, run.run_id))
        artifacts.upload_file(key, results)
        digest = sha256_file(results)
        size = results.stat().st_size
    with run.session_factory() as session:
        predictions.finish_run(
            session,
            run.run_id,
            owner=run.owner,
            results_key=key,
            sha256=digest,
            size=size,
            done=counts.done,
            failed=counts.failed,
            abstained=counts.abstained,
        )
    log.info("prediction run %s classified %d images (%d unusable)", run.run_id, counts.done, counts.failed)


def run_prediction(
    run_id: str,
    *,
    session_factory: sessionmaker[Session],
    settings: Settings,
    worker_id: str,
    device: torch.device | str | None = None,
) -> None:
    """Run one batch prediction to a terminal state; return at once if it has finished already or
    another live worker holds it (a duplicate message)."""
    lease_s = settings.worker.lease_seconds
    with session_factory() as session:
        if not predictions.start_run(session, run_id, owner=worker_id, lease_seconds=lease_s):
            log.info("prediction run %s is finished or held by a live worker; nothing to do", run_id)
            return

    def beat() -> bool:
        with session_factory() as session:
            return predictions.heartbeat(session, run_id, owner=worker_id, lease_seconds=lease_s)

    with renewing(beat, settings.worker.heartbeat_seconds, f"prediction run {run_id}") as lost:
        run = _Run(run_id, session_factory, settings, worker_id, lost)
        try:
            _run(run, torch.device(device) if device else default_device())
        except LeaseLost:
            log.warning("prediction run %s was taken over by another worker; stopped", run_id)
        except (PredictionFailed, DomainError, MustError) as exc:
            message = exc.message if isinstance(exc, DomainError) else str(exc)
            if isinstance(exc, StorageError):
                message = f"the object store failed: {message}"
            _fail(run, type(exc).__name__, message)
        except Exception as exc:
            _fail(run, type(exc).__name__, f"internal error ({type(exc).__name__}); see the worker log")
            raise


def _fail(run: _Run, error_type: str, message: str) -> None:
    log.warning("prediction run %s failed: %s", run.run_id, message)
    with run.session_factory() as session:
        predictions.fail_run(session, run.run_id, error_type=error_type, message=message, owner=run.owner)
