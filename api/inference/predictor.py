"""The model side of the inference service (no FastAPI here): artifact cache, micro-batcher, predictor.

The split follows LitServe's `LitAPI`: routes decode the HTTP request, call `Predictor`'s
decode / predict / encode steps, and encode the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.inference.errors import AdaptationNotReady, ImageRejected, WeightsNotAvailable, public_reason
from api.inference.memory import release_freed_memory
from api.inference.pixel_split import PixelSteps, normalize, pixel_steps, to_uint8
from services.db.models import Job
from services.errors import ArtifactMissing, InvalidRequest, JobNotFound, RequestTooLarge
from services.jobs import repository
from services.jobs.states import JobStatus
from services.must.classifier import validate_class_names, validate_templates
from services.must.data import ImageLoadError, decode_image, image_size
from services.must.errors import CheckpointError, MustError, WeightsUnavailable
from services.must.export import MANIFEST, WEIGHTS, load_classifier, read_manifest
from services.must.inference import ImageClassifier
from services.must.loading import ModelSpec, load_clip
from services.storage.base import ObjectStore
from services.storage.keys import classifier_manifest_key, classifier_weights_key, join_key

log = logging.getLogger(__name__)

Forward = Callable[[ImageClassifier, torch.Tensor], torch.Tensor]
# Requests whose images hold this many pixels give the memory of their decodes back afterwards
# (a 2000x2000 image decodes to 12 MB; smaller ones are served from memory glibc keeps anyway).
TRIM_AFTER_PIXELS = 4_000_000
# Threads that load models: this many slow loads (downloads) at once before further loads queue.
LOAD_THREADS = 8


@dataclass(frozen=True)
class ZeroShotRequest:
    """A zero-shot baseline: a CLIP, the class list and optional prompt templates."""

    spec: ModelSpec
    class_names: tuple[str, ...]
    templates: tuple[str, ...] | None = None

    def key(self) -> str:
        """A cache key that also covers a custom config given as a dict (ModelSpec does not hash it)."""
        spec = self.spec
        config = json.dumps(spec.config, sort_keys=True) if isinstance(spec.config, dict) else spec.config
        parts = [spec.arch, spec.pretrained, spec.checkpoint, config, self.class_names, self.templates]
        return "zero-shot:" + json.dumps(parts)


@dataclass
class ServedModel:
    """A loaded classifier and how responses describe it."""

    key: str
    classifier: ImageClassifier
    description: dict[str, Any]
    adaptation_id: str | None = None
    artifact_sha256: str | None = None
    # The job's default abstain threshold (`min_probability` of its request), if it set one.
    min_probability: float | None = None
    # Worked out once per loaded model, not per request.
    pixels: PixelSteps | None = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = pixel_steps(self.classifier)


def canonical_job_id(raw: str) -> str:
    """The canonical form of a job id; a string that is not a UUID names no adaptation."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise JobNotFound(raw[:64]) from None


@dataclass
class ClassifierCache:
    """Loaded classifiers, least recently used evicted beyond `max_models`.

    Adapted classifiers are keyed by job id and reloaded when the job's `artifact_sha256` changes;
    their files are kept on disk under `cache_dir/<job id>/<sha256>/` so a reload after eviction
    does not download again. The job row is read at most once per `recheck_s` per adaptation
    (`recent`): a newer artifact is served within that many seconds of its publication, and
    requests in between cost no database round trip. Every lookup checks the job's tenant, so a
    key never reaches another tenant's classifier (404, as if it did not exist).

    Each model loads under a lock of its own, so two requests never load the same model twice,
    while a slow load (a weights download) holds back neither other loads nor the models already
    loaded; the shared lock only guards the dictionaries, never any I/O.
    """

    session_factory: sessionmaker[Session]
    store: ObjectStore
    prefix: str
    cache_dir: Path
    device: str | torch.device = "cpu"
    max_models: int = 4
    recheck_s: float = 2.0
    # Gives a local path for a zero-shot model file named by URI (downloading an s3:// one once).
    model_file: Callable[[str], str] | None = None
    _models: OrderedDict[str, ServedModel] = field(default_factory=OrderedDict, init=False)
    # Job id -> (time.monotonic() of the job lookup that confirmed it, its tenant, the classifier).
    _confirmed: dict[str, tuple[float, str, ServedModel]] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # Cache key -> the lock its load runs under (dropped once no load of it is running).
    _loading: dict[str, threading.Lock] = field(default_factory=dict, init=False)

    def adapted(self, adaptation_id: str, tenant: str | None = None) -> ServedModel:
        """The classifier of a succeeded adaptation (of `tenant`; None: any), at the job row's version."""
        job_id = canonical_job_id(adaptation_id)
        with self.session_factory() as session:
            try:
                job = repository.get_job(session, job_id, tenant=tenant)
            except JobNotFound:
                if session.get(Job, job_id) is None:
                    self.forget(job_id)  # deleted: free its memory and its files on disk
                raise
            status, sha, owner = job.status, job.artifact_sha256, job.tenant
            threshold = (job.request or {}).get("min_probability")
        if status != JobStatus.SUCCEEDED or not sha:
            raise AdaptationNotReady(job_id, str(status))
        checked_at = time.monotonic()
        previous = self.peek(job_id)
        served = self._load_once(
            job_id,
            lambda: self._load_adapted(job_id, sha, threshold),
            accept=lambda s: s.artifact_sha256 == sha,
        )
        with self._lock:
            self._confirmed[job_id] = (checked_at, owner, served)
        if previous is not None and previous.artifact_sha256 != sha:
            shutil.rmtree(self.cache_dir / job_id / str(previous.artifact_sha256), ignore_errors=True)
        return served

    def recent(self, adaptation_id: str, tenant: str | None = None) -> ServedModel | None:
        """The loaded classifier of an adaptation whose job was read less than `recheck_s` ago.

        No lock and no I/O, so it runs on the event loop; None means `adapted` must look (and
        answer 404 for another tenant's job). The least-recently-used order is refreshed by
        `adapted`, so once per `recheck_s` of use.
        """
        try:
            job_id = canonical_job_id(adaptation_id)
        except JobNotFound:
            return None
        entry = self._confirmed.get(job_id)
        if entry is None or time.monotonic() - entry[0] >= self.recheck_s:
            return None
        checked_at, owner, served = entry
        if tenant is not None and owner != tenant:
            return None
        return served

    def forget(self, job_id: str) -> None:
        """Drop a deleted adaptation's classifier from memory and its downloaded files from disk."""
        with self._lock:
            dropped = self._models.pop(job_id, None)
            self._confirmed.pop(job_id, None)
        shutil.rmtree(self.cache_dir / job_id, ignore_errors=True)
        if dropped is not None:
            log.info("adaptation %s was deleted; dropped its classifier from the cache", job_id)

    def peek(self, key: str) -> ServedModel | None:
        """The loaded model under `key`, without loading anything (and without waiting for a load)."""
        return self._models.get(key)

    def zero_shot(self, request: ZeroShotRequest) -> ServedModel:
        """The zero-shot baseline classifier for a CLIP and class list."""
        key = request.key()
        return self._load_once(key, lambda: self._load_zero_shot(request, key))

    def _load_once(
        self,
        key: str,
        load: Callable[[], ServedModel],
        accept: Callable[[ServedModel], bool] = lambda served: True,
    ) -> ServedModel:
        """The cached model under `key` if `accept`ed, else loaded under the key's own lock."""
        with self._lock:
            cached = self._get(key)
            if cached is not None and accept(cached):
                return cached
            key_lock = self._loading.setdefault(key, threading.Lock())
        try:
            with key_lock:
                # Another request may have loaded it while this one waited for the key's lock.
                with self._lock:
                    cached = self._get(key)
                if cached is not None and accept(cached):
                    return cached
                served = load()
                with self._lock:
                    self._put(served)
                return served
        finally:
            with self._lock:
                if self._loading.get(key) is key_lock and not key_lock.locked():
                    del self._loading[key]

    def _get(self, key: str) -> ServedModel | None:
        served = self._models.get(key)
        if served is not None:
            self._models.move_to_end(key)
        return served

    def _put(self, served: ServedModel) -> None:
        self._models[served.key] = served
        self._models.move_to_end(served.key)
        while len(self._models) > self.max_models:
            evicted, _ = self._models.popitem(last=False)
            self._confirmed.pop(evicted, None)
            log.info("evicted classifier %s from the cache", evicted)

    def _load_adapted(self, job_id: str, sha: str, min_probability: float | None = None) -> ServedModel:
        model_dir = self._download(job_id, sha)
        try:
            classifier = load_classifier(model_dir, self.device)
            manifest = read_manifest(model_dir)
        except CheckpointError as exc:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise ArtifactMissing(f"adaptation {job_id!r} has an unusable classifier: {exc}") from exc
        if manifest.weights_sha256 != sha:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise ArtifactMissing(f"adaptation {job_id!r}: the stored classifier is not the recorded version")
        description = {
            "kind": "adapted",
            "source_model": manifest.source_model,
            "class_names": manifest.class_names,
            "network": manifest.network,
            "created_at": manifest.created_at,
        }
        return ServedModel(job_id, classifier, description, job_id, sha, min_probability)

    def _download(self, job_id: str, sha: str) -> Path:
        """The artifact's local folder, downloaded (manifest first, to detect a concurrent republish)."""
        target = self.cache_dir / job_id / sha
        if (target / MANIFEST).is_file() and (target / WEIGHTS).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            self.store.download_file(
                join_key(self.prefix, classifier_manifest_key(job_id)), staging / MANIFEST
            )
            self.store.download_file(join_key(self.prefix, classifier_weights_key(job_id)), staging / WEIGHTS)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec with remote checkpoint and config files replaced by local copies."""
        if self.model_file is None:
            return spec
        fetch = self.model_file
        return replace(
            spec,
            checkpoint=fetch(spec.checkpoint) if spec.checkpoint else None,
            config=fetch(spec.config) if isinstance(spec.config, str) else spec.config,
        )

    def _public(self, error: Exception) -> str:
        """An engine error's message without this service's local folders (downloaded copies)."""
        return str(error).replace(str(self.cache_dir), "<model cache>")

    def _load_zero_shot(self, request: ZeroShotRequest, key: str) -> ServedModel:
        try:
            names = validate_class_names(request.class_names)
            templates = validate_templates(request.templates)
            clip = load_clip(self._local_spec(request.spec), self.device)
        except WeightsUnavailable as exc:
            unavailable = WeightsNotAvailable if exc.transient else InvalidRequest
            raise unavailable(f"cannot build the zero-shot baseline: {exc}") from exc
        except MustError as exc:
            raise InvalidRequest(f"cannot build the zero-shot baseline: {self._public(exc)}") from exc
        except OSError as exc:
            log.warning("zero-shot model %s could not be read: %s", request.spec.describe(), exc)
            raise InvalidRequest(
                "cannot build the zero-shot baseline: a model file could not be read"
            ) from exc
        classifier = ImageClassifier.zero_shot(clip, names, templates, device=self.device)
        spec = request.spec
        source = {"arch": spec.arch, "pretrained": spec.pretrained, "checkpoint": spec.checkpoint}
        source["config"] = spec.config if isinstance(spec.config, str) else None
        description = {
            "kind": "zero_shot",
            "source_model": source,
            "class_names": names,
            "templates": templates,
        }
        return ServedModel(key, classifier, description)


class Arrival:
    """A request counted as on its way to the batcher, from route entry until it is queued or ends."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher
        batcher.incoming += 1

    def close(self) -> None:
        """Stop counting the request (idempotent)."""
        if self._batcher is not None:
            self._batcher.incoming -= 1
            self._batcher = None


@dataclass
class _Pending:
    model: ServedModel
    pixels: torch.Tensor
    done: asyncio.Future[torch.Tensor]


class MicroBatcher:
    """Collects concurrent requests into batches of up to `max_batch` images, one forward per model.

    A batch waits only while more requests are known to be on their way (`incoming`: counted by
    an `Arrival` from the route's entry, through the job lookup and decoding, until queued), and
    at most `max_wait_s` or a tenth of the last forward's time, whichever is longer: a lone
    request goes at once, and on a slow device the requests that arrive together are not split
    into a small batch and a large one (small batches cost more per image, and once split, the
    two groups of clients would stay out of step).
    A single worker task runs the forwards one after another in one thread, so the event loop
    stays free and the device never runs two batches at once; requests that arrive during a
    forward form the next batch.
    """

    # The longest wait for incoming requests, as a fraction of the last forward's duration.
    WAIT_FRACTION = 0.1

    def __init__(self, forward: Forward, *, max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.incoming = 0
        self._last_forward_s = 0.0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        # Always the same thread: torch keeps one team of intra-op threads per calling thread.
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    async def submit(
        self, model: ServedModel, pixels: torch.Tensor, arrival: Arrival | None = None
    ) -> torch.Tensor:
        """Class probabilities for `pixels`, computed in a batch with other pending requests."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(self._queue))
        done: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        # Queued and no longer counted as incoming in one step: the batcher never sees both.
        self._queue.put_nowait(_Pending(model, pixels, done))
        if arrival is not None:
            arrival.close()
        return await done

    async def close(self) -> None:
        """Stop the worker task."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._device_thread.shutdown(wait=False, cancel_futures=True)

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        batch = [await queue.get()]
        size = len(batch[0].pixels)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.max_wait_s, self.WAIT_FRACTION * self._last_forward_s)
        while size < self.max_batch:
            if queue.empty() and self.incoming == 0:
                break
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            batch.append(item)
            size += len(item.pixels)
        return batch

    async def _run(self, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            batch = await self._collect(queue)
            # Grouped by the loaded object, not the cache key: a reload may change a key's model mid-batch.
            groups: dict[int, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(id(item.model.classifier), []).append(item)
            for items in groups.values():
                await self._execute(items)

    def _forward_all(self, classifier: ImageClassifier, parts: list[torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        probs = self.forward(classifier, torch.cat(parts) if len(parts) > 1 else parts[0])
        self._last_forward_s = time.perf_counter() - start
        return probs

    async def _execute(self, items: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        parts = [item.pixels for item in items]
        try:
            probs = await loop.run_in_executor(
                self._device_thread, self._forward_all, items[0].model.classifier, parts
            )
        except Exception as exc:
            for item in items:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        start = 0
        for item in items:
            stop = start + len(item.pixels)
            if not item.done.done():
                item.done.set_result(probs[start:stop])
            start = stop


def _input_side(classifier: ImageClassifier) -> int:
    """The longer side of the classifier's input images (what uploads are resized to)."""
    size = classifier.preprocess_cfg.size
    return int(size) if isinstance(size, int) else int(max(size))


def run_forward(classifier: ImageClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """One forward pass of 8-bit or normalised pixels: class probabilities [B, K] on the CPU."""
    with torch.inference_mode():
        return classifier.predict(normalize(pixels, classifier))


class Predictor:
    """decode (bytes to pixels, in a thread pool) → predict (micro-batched) → encode (top-k labels)."""

    def __init__(
        self,
        cache: ClassifierCache,
        *,
        max_image_bytes: int,
        max_image_pixels: int,
        max_request_pixels: int = 100_000_000,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        preprocess_workers: int = 2,
    ) -> None:
        self.cache = cache
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.batcher = MicroBatcher(self.forward, max_batch=max_batch, max_wait_s=max_wait_s)
        self._pool = ThreadPoolExecutor(max_workers=preprocess_workers, thread_name_prefix="preprocess")
        # Zero-shot loads (and their weight downloads) get threads of their own: however slow, they
        # never hold up the default pool that job lookups, artifact loads and image reads run in.
        self._loads = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="model-load")

    def forward(self, classifier: ImageClassifier, pixels: torch.Tensor) -> torch.Tensor:
        """One batched forward; an attribute of its own so it can be observed."""
        return run_forward(classifier, pixels)

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Count a request as on its way to the batcher until `predict` queues it or it ends."""
        arrival = Arrival(self.batcher)
        try:
            yield arrival
        finally:
            arrival.close()

    async def adapted(self, adaptation_id: str, tenant: str | None = None) -> ServedModel:
        """The adapted classifier of `tenant` (None: any); a due job lookup and any load run in a thread."""
        served = self.cache.recent(adaptation_id, tenant)
        if served is not None:
            return served
        return await asyncio.to_thread(self.cache.adapted, adaptation_id, tenant)

    async def zero_shot(self, request: ZeroShotRequest) -> ServedModel:
        """The zero-shot baseline classifier (built in a loader thread on first use)."""
        served = self.cache.peek(request.key())
        if served is not None:
            return served
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loads, self.cache.zero_shot, request)

    async def decode(
        self, model: ServedModel, images: Sequence[tuple[str, bytes]]
    ) -> tuple[torch.Tensor | None, list[ImageRejected | None]]:
        """Decode and preprocess named image bytes off the event loop: the pixels of the usable images
        (None if there is none) and, for each image in order, why it was rejected (None: used)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._preprocess, model, images)

    def _preprocess(
        self, model: ServedModel, images: Sequence[tuple[str, bytes]]
    ) -> tuple[torch.Tensor | None, list[ImageRejected | None]]:
        """Pixels of every usable image, each decoded (reduced where it is large) and preprocessed in turn.

        The pixel budget is checked on the headers before anything is decoded, and an image is
        brought to the model's input size before the next one is decoded, so a request holds at
        most one full-size image at a time. Memory freed by a large decode is handed back to
        the system at the end.
        """
        pixels = self._check_pixel_budget(images)
        side = _input_side(model.classifier)
        rejected: list[ImageRejected | None] = [None] * len(images)
        batch: list[torch.Tensor] = []
        try:
            for i, (name, data) in enumerate(images):
                try:
                    image = self._decode_one(name, data, side)
                except ImageRejected as exc:
                    rejected[i] = exc
                    continue
                if model.pixels is None:
                    batch.append(model.classifier.preprocess([image]))
                else:
                    batch.append(to_uint8(model.pixels, [image]))
                del image
            return (torch.cat(batch) if batch else None), rejected
        finally:
            if pixels >= TRIM_AFTER_PIXELS:
                release_freed_memory()

    def _decode_one(self, name: str, data: bytes, side: int) -> Image.Image:
        try:
            return decode_image(
                data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, min_side=side
            )
        except ImageLoadError as exc:
            raise ImageRejected(name, exc.reason, public_reason(exc)) from None

    def _check_pixel_budget(self, images: Sequence[tuple[str, bytes]]) -> int:
        """The pixels the images' headers add up to; RequestTooLarge beyond what one request may hold."""
        total = 0
        for _, data in images:
            size = image_size(data)
            total += size[0] * size[1] if size else 0
        if total > self.max_request_pixels:
            raise RequestTooLarge(
                f"the images of this request hold {total:,} pixels together; at most "
                f"{self.max_request_pixels:,} (MUST_LIMITS__MAX_REQUEST_PIXELS): send fewer or smaller images"
            )
        return total

    async def predict(
        self, model: ServedModel, pixels: torch.Tensor, arrival: Arrival | None = None
    ) -> torch.Tensor:
        """Class probabilities [B, K], batched with concurrent requests for the same model."""
        return await self.batcher.submit(model, pixels, arrival)

    def encode(self, model: ServedModel, probs: torch.Tensor, top_k: int) -> list[list[dict[str, Any]]]:
        """The `top_k` labels and probabilities of each image."""
        return model.classifier.top_k(probs, top_k)

    async def close(self) -> None:
        """Stop the batcher, the preprocessing and the loader threads."""
        await self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loads.shutdown(wait=False, cancel_futures=True)
