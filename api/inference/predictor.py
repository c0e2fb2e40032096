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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.inference.batching import Arrival, MicroBatcher, Work, answer
from api.inference.device import Precision, TensorDecoder, autocast, autocast_dtype
from api.inference.errors import (
    AdaptationNotReady,
    ImageRejected,
    NoUsableImages,
    WeightsNotAvailable,
    public_reason,
)
from api.inference.memory import release_freed_memory
from api.inference.pixels import PixelSteps, normalize, pixel_steps, prepare, stack
from api.inference.threads import ThreadChooser
from services.db.models import Job
from services.errors import ArtifactMissing, InvalidRequest, JobNotFound, RequestTooLarge
from services.jobs import repository
from services.jobs.states import JobStatus
from services.must.classifier import validate_class_names, validate_templates
from services.must.data import ImageLoadError, check_pixels, load_image, open_image
from services.must.errors import CheckpointError, MustError, WeightsUnavailable
from services.must.export import MANIFEST, WEIGHTS, load_classifier, read_manifest
from services.must.inference import ImageClassifier
from services.must.loading import ModelSpec, load_clip
from services.storage.base import ObjectStore
from services.storage.keys import classifier_manifest_key, classifier_weights_key, join_key

log = logging.getLogger(__name__)

# An image's top labels: [{"label", "probability"}, ...], most probable first.
Ranked = list[dict[str, Any]]
# Requests whose images hold this many pixels give the memory of their decodes back afterwards
# (a 2000x2000 image decodes to 12 MB; smaller ones are served from memory glibc keeps anyway).
TRIM_AFTER_PIXELS = 4_000_000
# Threads that load models: this many slow loads (downloads) at once before further loads queue.
LOAD_THREADS = 8
# A request runs on its event loop, skipping the decoding and forward threads, only while the
# service is otherwise idle, for one image of at most this many pixels, on a model whose one-image
# forward takes at most this long (the tiny CLIP on a CPU, a ViT-B-32 on a GPU; not a CPU ViT-B-32).
RUN_HERE_MAX_PIXELS = 1024 * 1024
RUN_HERE_MAX_FORWARD_S = 0.01


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
    # On a GPU: decodes and resizes the JPEGs there (None: every image goes through PIL).
    decoder: TensorDecoder | None = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = pixel_steps(self.classifier)
        on_gpu = self.classifier.device.type == "cuda" and self.pixels is not None
        self.decoder = (
            TensorDecoder.for_preprocess(self.classifier.preprocess_cfg, self.classifier.device)
            if on_gpu
            else None
        )


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


def _input_side(classifier: ImageClassifier) -> int:
    """The longer side of the classifier's input images (what uploads are resized to)."""
    size = classifier.preprocess_cfg.size
    return int(size) if isinstance(size, int) else int(max(size))


def run_forward(
    classifier: ImageClassifier, pixels: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One forward pass of 8-bit or normalised pixels: class probabilities [B, K] on the CPU.

    `dtype`: the autocast precision of the image tower (None: fp32); the head and the softmax
    run in fp32 either way. The classifier is in eval mode from its load: `predict` would set
    it again on every call (a walk over every module) and split the batch.
    """
    device = classifier.device
    with torch.inference_mode():
        pixels = normalize(pixels.to(device, non_blocking=True), classifier)
        with autocast(device, dtype):
            logits = classifier(pixels)
        if dtype is torch.float16 and not bool(torch.isfinite(logits).all()):
            logits = classifier(pixels)  # an activation overflowed fp16: this batch in fp32
        return logits.float().softmax(-1).cpu()


class Predictor:
    """Images to top labels: decoding threads → the micro-batched forward → rows back to the event loop.

    A request costs the event loop one hand-off (`classify` gives its bytes to a decoding thread)
    and one wake-up (its rows); decoded pixels go from the decoding thread straight to the
    forward thread's queue.
    """

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
        threads: ThreadChooser | None = None,
        precision: Precision = "auto",
    ) -> None:
        self.cache = cache
        self.precision = precision
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.batcher = MicroBatcher(self.forward, max_batch=max_batch, max_wait_s=max_wait_s, threads=threads)
        self._pool = ThreadPoolExecutor(max_workers=preprocess_workers, thread_name_prefix="preprocess")
        # Zero-shot loads (and their weight downloads) get threads of their own: however slow, they
        # never hold up the default pool that job lookups, artifact loads and image reads run in.
        self._loads = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="model-load")

    def forward(self, classifier: ImageClassifier, pixels: torch.Tensor) -> torch.Tensor:
        """One batched forward; an attribute of its own so it can be observed."""
        return run_forward(classifier, pixels, autocast_dtype(classifier.device, self.precision))

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Count a request as on its way to the batcher until `classify` queues it or it ends."""
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

    async def classify(
        self,
        model: ServedModel,
        images: Sequence[tuple[str, bytes]],
        top_k: int,
        arrival: Arrival | None = None,
    ) -> list[Ranked | ImageRejected]:
        """For each named image in order, its `top_k` labels or why it was rejected.

        Raises the rejection when the only image is unusable, NoUsableImages when none of
        several is, and RequestTooLarge when the images hold too many pixels together.
        """
        here = self._run_here(model, images, top_k, arrival)
        if here is not None:
            return here
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Ranked | ImageRejected]] = loop.create_future()
        work = Work(model.classifier, _NO_PIXELS, loop, future)
        self._pool.submit(self._decode_and_queue, model, images, top_k, arrival, work)
        return await future

    def _run_here(
        self, model: ServedModel, images: Sequence[tuple[str, bytes]], top_k: int, arrival: Arrival | None
    ) -> list[Ranked | ImageRejected] | None:
        """The answer computed on the calling event loop, or None to send the request through the threads.

        Only while no other request is queued, running or on its way (`MicroBatcher.claim`),
        and only for one image of at most RUN_HERE_MAX_PIXELS by its header, for a model whose
        latest one-image forward took at most RUN_HERE_MAX_FORWARD_S: the loop is held for about
        that long, and anything larger is better off on the threads.
        """
        forward_s = self.batcher.single_seconds(model.classifier)
        if len(images) != 1 or forward_s is None or forward_s > RUN_HERE_MAX_FORWARD_S:
            return None
        if not self.batcher.claimable(arrival):  # under load: no header read on the loop for nothing
            return None
        opened, rejected = self._open(images)
        if any(image.width * image.height > RUN_HERE_MAX_PIXELS for _, image in opened):
            return None
        if not self.batcher.claim(arrival):
            return None
        try:
            pixels, rejected = self._usable(self._decode(model, images, opened, rejected))
            probs = self.batcher.run_here(model.classifier, pixels)
            return _rank(model.classifier, rejected, top_k, probs)
        finally:
            self.batcher.unclaim()

    def _decode_and_queue(
        self,
        model: ServedModel,
        images: Sequence[tuple[str, bytes]],
        top_k: int,
        arrival: Arrival | None,
        work: Work,
    ) -> None:
        """In a decoding thread: the request's pixels onto the forward queue, or its error back."""
        if work.future.done():  # the client went away while it waited for a thread
            return
        try:
            pixels, rejected = self._usable(self._preprocess(model, images))
        except Exception as exc:  # a rejection, too large, or a bug: the request fails, the thread goes on
            answer(work, error=exc)
            return
        work.pixels = pixels
        work.finish = partial(_rank, model.classifier, rejected, top_k)
        self.batcher.put(work, arrival)

    @staticmethod
    def _usable(
        decoded: tuple[torch.Tensor | None, list[ImageRejected | None]],
    ) -> tuple[torch.Tensor, list[ImageRejected | None]]:
        """The decoded pixels, or the rejection (NoUsableImages for several) when no image was usable."""
        pixels, rejected = decoded
        if pixels is None:
            errors = [error for error in rejected if error is not None]
            raise errors[0] if len(errors) == 1 else NoUsableImages(errors)
        return pixels, rejected

    def _preprocess(
        self, model: ServedModel, images: Sequence[tuple[str, bytes]]
    ) -> tuple[torch.Tensor | None, list[ImageRejected | None]]:
        """Pixels of every usable image, each decoded (reduced where it is large) and preprocessed in turn.

        Every header is read first and the request's pixel budget checked on them before
        anything is decoded; an image is then brought to the model's input size before the next
        one is decoded, so a request holds at most one full-size image at a time. Memory freed
        by a large decode is handed back to the system at the end.
        """
        opened, rejected = self._open(images)
        return self._decode(model, images, opened, rejected)

    def _open(
        self, images: Sequence[tuple[str, bytes]]
    ) -> tuple[list[tuple[int, Image.Image]], list[ImageRejected | None]]:
        """Every image's header read (by index), or its rejection; RequestTooLarge beyond the pixel budget."""
        rejected: list[ImageRejected | None] = [None] * len(images)
        opened: list[tuple[int, Image.Image]] = []
        for i, (name, data) in enumerate(images):
            try:
                opened.append((i, self._guarded(name, open_image, data, max_bytes=self.max_image_bytes)))
            except ImageRejected as exc:
                rejected[i] = exc
        self._check_pixel_budget([image.size for _, image in opened])
        return opened, rejected

    def _decode(
        self,
        model: ServedModel,
        images: Sequence[tuple[str, bytes]],
        opened: list[tuple[int, Image.Image]],
        rejected: list[ImageRejected | None],
    ) -> tuple[torch.Tensor | None, list[ImageRejected | None]]:
        """The opened images decoded and preprocessed, on the model's device decoder where it has one."""
        pixels = sum(image.width * image.height for _, image in opened)
        try:
            on_device = self._decode_on_device(model, images, opened, rejected)
            return self._decode_with_pil(model, images, opened, rejected, on_device), rejected
        finally:
            opened.clear()
            if pixels >= TRIM_AFTER_PIXELS:
                release_freed_memory()

    def _decode_on_device(
        self,
        model: ServedModel,
        images: Sequence[tuple[str, bytes]],
        opened: list[tuple[int, Image.Image]],
        rejected: list[ImageRejected | None],
    ) -> tuple[list[int], torch.Tensor] | None:
        """The JPEGs decoded by the model's device decoder (their indices and pixels), taken out of
        `opened`; None, leaving them to PIL, without a decoder or when it fails on one of them."""
        decoder = model.decoder
        if decoder is None:
            return None
        chosen = []
        for i, image in opened:
            if image.format != "JPEG":
                continue
            try:  # the limit load_image would apply
                self._guarded(images[i][0], check_pixels, image, self.max_image_pixels)
            except ImageRejected as exc:
                rejected[i] = exc
                continue
            chosen.append((i, image))
        if not chosen:
            return None
        try:
            pixels = decoder.decode([images[i][1] for i, _ in chosen])
        except Exception as exc:  # nvJPEG refuses some JPEGs (e.g. CMYK, arithmetic coding): PIL can
            log.info("device JPEG decoding failed (%s); decoding with PIL", exc)
            return None
        indices = {i for i, _ in chosen}
        opened[:] = [(i, image) for i, image in opened if i not in indices and rejected[i] is None]
        return [i for i, _ in chosen], pixels

    def _decode_with_pil(
        self,
        model: ServedModel,
        images: Sequence[tuple[str, bytes]],
        opened: list[tuple[int, Image.Image]],
        rejected: list[ImageRejected | None],
        on_device: tuple[list[int], torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """The remaining images decoded with PIL, joined in request order with those decoded on the device."""
        side, steps = _input_side(model.classifier), model.pixels
        floats: list[torch.Tensor] = []  # a preprocessing that cannot be split runs here whole
        prepared: list[np.ndarray] = []
        order: list[int] = []
        for i, image in opened:
            try:
                loaded = self._guarded(
                    images[i][0], load_image, image, max_pixels=self.max_image_pixels, min_side=side
                )
            except ImageRejected as exc:
                rejected[i] = exc
                continue
            if steps is None:
                floats.append(model.classifier.preprocess([loaded]))
            else:
                prepared.append(prepare(steps, loaded))
            order.append(i)
            del loaded
        pixels = stack(prepared) if prepared else torch.cat(floats) if floats else None
        if on_device is None:
            return pixels
        indices, device_pixels = on_device
        if pixels is None:
            return device_pixels
        # Both parts are 8-bit (a decoder exists only for a split preprocessing): joined on the
        # device, back in the request's order.
        joined = torch.cat([device_pixels, pixels.to(device_pixels.device)])
        position = {index: row for row, index in enumerate(indices + order)}
        return joined[[position[i] for i in sorted(position)]]

    @staticmethod
    def _guarded(name: str, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`open_image`, `check_pixels` or `load_image`, with a failure as the named image's rejection."""
        try:
            return step(*args, **kwargs)
        except ImageLoadError as exc:
            raise ImageRejected(name, exc.reason, public_reason(exc)) from None

    def _check_pixel_budget(self, sizes: Sequence[tuple[int, int]]) -> int:
        """The pixels of the images' headers together; RequestTooLarge beyond what one request may hold."""
        total = sum(width * height for width, height in sizes)
        if total > self.max_request_pixels:
            raise RequestTooLarge(
                f"the images of this request hold {total:,} pixels together; at most "
                f"{self.max_request_pixels:,} (MUST_LIMITS__MAX_REQUEST_PIXELS): send fewer or smaller images"
            )
        return total

    async def close(self) -> None:
        """Stop the batcher, the preprocessing and the loader threads."""
        await self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loads.shutdown(wait=False, cancel_futures=True)


# A request's pixels before its decoding thread has produced them.
_NO_PIXELS = torch.empty(0)


def _rank(
    classifier: ImageClassifier, rejected: list[ImageRejected | None], top_k: int, probs: torch.Tensor
) -> list[Ranked | ImageRejected]:
    """In the forward thread: each usable image's top labels, in the request's order with its rejections."""
    ranked = iter(classifier.top_k(probs, top_k))
    return [error if error is not None else next(ranked) for error in rejected]
