"""One training job from lease to published classifier: the worker's side of the job lifecycle.

The job row is the source of truth: the queue message carries only the job id, the lease keeps
two workers from running the same job, and checkpoints in the artifacts store let a redelivered
job resume where the last one stopped (DESIGN.md sections 5 and 6).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.errors import (
    DomainError,
    InvalidJobTransition,
    InvalidRequest,
    JobNotFound,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from services.jobs import repository
from services.jobs.states import JobPhase, JobStatus
from services.locations import check_request_locations
from services.must.adapt import Adaptation, default_device, start
from services.must.checkpoint import LATEST, CheckpointFiles, read_latest
from services.must.config import MustConfig
from services.must.data import Labelled
from services.must.errors import (
    Cancelled,
    CheckpointError,
    ConfigError,
    DatasetError,
    DistributedRunError,
    ModelLoadError,
    MustError,
)
from services.must.export import MANIFEST, WEIGHTS, Manifest
from services.must.instant import INSTANT, InstantRun, start_instant
from services.must.loading import ModelSpec, pretrained_file, resolve_model_config
from services.must.trainer import FitResult, TrainerHooks
from services.schemas.jobs import (
    INSTANT_HPARAM_NAMES,
    MAX_LABELLED_PER_CLASS,
    AdaptationCreate,
    requested_gpus,
)
from services.storage import keys
from services.storage.base import ObjectStore
from services.storage.object_store import local_copy, open_store, publish
from services.storage.retrying import RetryingStore, retry_storage
from worker.dataset import LabelledImages, StagedImages, stage_eval_set, stage_images
from worker.launch import launch_ranks, write_plan
from worker.logs import JobLogBuffer, collect_job_logs
from worker.progress import keep_lease, make_cancel_check, make_progress_reporter
from worker.samples import class_samples
from worker.store_care import prune_checkpoints, requeue_after_outage

log = logging.getLogger(__name__)

# latest.json is a few hundred bytes; anything much larger is not ours.
MAX_POINTER_BYTES = 1 << 20
# One metrics row every few seconds: a week-long job stays well under this.
MAX_METRIC_ROWS = 500_000
# Cached image features (fp16): 8 GiB holds a few million images of a 1,024-wide tower.
MAX_FEATURE_BYTES = 8 << 30

Run = Adaptation | InstantRun


def default_work_dir() -> Path:
    """Where jobs keep their image cache and local checkpoints unless told otherwise."""
    return Path(tempfile.gettempdir()) / "must-worker"


@dataclass
class JobContext:
    """What every step of one job needs: who holds it, where its files go, where it publishes."""

    job_id: str
    owner: str
    settings: Settings
    session_factory: sessionmaker[Session]
    work_dir: Path
    store: ObjectStore
    store_prefix: str
    device: torch.device
    logs: JobLogBuffer | None = None
    # False in the ranks other than 0 of a multi-GPU job: rank 0 alone writes the job's state.
    main: bool = True

    def key(self, key: str) -> str:
        """`key` inside the artifacts store (which may itself sit under a prefix)."""
        return keys.join_key(self.store_prefix, key)

    def set_phase(self, phase: JobPhase) -> None:
        """Record what the job is doing now (and store the log lines of the phase before)."""
        if not self.main:
            return
        with self.session_factory() as session:
            repository.set_phase(session, self.job_id, phase=phase, owner=self.owner)
        log.info("job %s: %s", self.job_id, phase.value)
        self.store_logs()

    def store_logs(self, final: bool = False) -> None:
        """Write the job's log lines collected so far to the job database."""
        if self.logs is None:
            return
        lines = self.logs.drain(final)
        if not lines:
            return
        try:
            with self.session_factory() as session:
                repository.append_log_lines(session, self.job_id, lines)
        except Exception as exc:  # the job's own work matters more than its log lines
            log.warning("job %s: could not store %d log lines: %s", self.job_id, len(lines), exc)


def _acquire(job_id: str, session_factory: sessionmaker[Session], settings: Settings, owner: str) -> bool:
    """Take the job's lease; False when another worker holds it or the job is finished or gone."""
    try:
        with session_factory() as session:
            return repository.mark_running(
                session, job_id, owner=owner, lease_seconds=settings.worker.lease_seconds
            )
    except (InvalidJobTransition, JobNotFound) as exc:
        log.info("job %s is not runnable: %s", job_id, exc)
        return False


def _read_request(ctx: JobContext) -> AdaptationCreate:
    """The job's stored request, checked again (it may predate a rule, or come from elsewhere)."""
    with ctx.session_factory() as session:
        request = repository.get_job(session, ctx.job_id).request
    try:
        checked = AdaptationCreate.model_validate(request)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"the job's request is invalid: {problems}") from exc
    try:
        # Again here, with this worker's settings: nothing a request names may open the worker's files.
        check_request_locations(checked, ctx.settings)
    except InvalidRequest as exc:
        raise ConfigError(f"the job's request is invalid: {exc.message}") from exc
    return checked


def _local_model_file(location: str | None, ctx: JobContext) -> str | None:
    """A local path for a model file given as a path, a file:// URI or an s3:// URI (downloaded)."""
    if location is None:
        return None
    try:
        return retry_storage(
            lambda: local_copy(location, ctx.work_dir / "model", ctx.settings),
            ctx.settings.worker.storage_retry_seconds,
        )
    except StorageUnavailable:
        raise  # the store is away, the file may well be fine: the job goes back to the queue
    except StorageError as exc:
        raise ModelLoadError(f"cannot download the model file {location}: {exc}") from exc


def _check_weights(ctx: JobContext, request: AdaptationCreate) -> None:
    """Fail fast, before any image is listed, when a pretrained tag's weights cannot be had here."""
    model = request.model
    if model.pretrained is None or model.checkpoint is not None or model.config is not None:
        return
    spec = ModelSpec(
        arch=model.arch,
        pretrained=model.pretrained,
        allow_download=ctx.settings.models.allow_downloads,
        download_timeout=ctx.settings.models.download_timeout_seconds,
    )
    resolve_model_config(spec)  # an unknown architecture is named as such, not as a missing tag
    pretrained_file(spec)  # cached: a lookup; else one bounded download, or WeightsUnavailable


def _stage_dataset(ctx: JobContext, request: AdaptationCreate) -> StagedImages:
    """List and download the images, and record how many were used and skipped."""
    ctx.set_phase(JobPhase.LISTING)
    staged = stage_images(
        request.dataset.uri,
        ctx.work_dir / "images",
        ctx.settings,
        max_images=request.dataset.max_images,
        on_first_image=lambda: ctx.set_phase(JobPhase.STAGING),
    )
    with ctx.session_factory() as session:
        repository.update_progress(
            session,
            ctx.job_id,
            owner=ctx.owner,
            images_used=len(staged.paths),
            images_skipped=staged.skipped.total,
            skipped_reasons=dict(staged.skipped.counts),
        )
    return staged


def _stage_labelled(ctx: JobContext, request: AdaptationCreate) -> Labelled | None:
    """Few-label mode's images: every class 1..MAX_LABELLED_PER_CLASS of them, or a DatasetError."""
    if request.labelled is None:
        return None
    staged = stage_eval_set(
        request.labelled.uri, ctx.work_dir / "labelled", ctx.settings, request.class_names, "labelled set"
    )
    counts = Counter(staged.labels)
    names = request.class_names
    missing = [names[i] for i in range(len(names)) if counts[i] == 0]
    if missing:
        raise DatasetError(f"labelled set: no image for {len(missing)} class(es): {', '.join(missing[:10])}")
    over = [f"{names[i]} ({n})" for i, n in sorted(counts.items()) if n > MAX_LABELLED_PER_CLASS]
    if over:
        raise DatasetError(
            f"labelled set: few-label mode takes 1..{MAX_LABELLED_PER_CLASS} images per class; "
            f"more for {', '.join(over[:10])}"
        )
    log.info("job %s: labelled set of %d images staged", ctx.job_id, len(staged.paths))
    return Labelled(staged.paths, staged.labels)


def _stage_eval_set(ctx: JobContext, request: AdaptationCreate) -> LabelledImages | None:
    """Download the labelled eval set before training, so a bad one fails the job in minutes."""
    if request.eval is None:
        return None
    eval_set = stage_eval_set(request.eval.uri, ctx.work_dir / "eval", ctx.settings, request.class_names)
    log.info("job %s: eval set of %d labelled images staged", ctx.job_id, len(eval_set.paths))
    return eval_set


class StoreFeatureCache:
    """The instant method's feature cache in the artifacts store (`features/<tower>/<images>`),
    shared by every job on the same image tower and images."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def get(self, key: str) -> bytes | None:
        try:
            return self.ctx.store.read_bytes(
                self.ctx.key(keys.features_key(key)), max_bytes=MAX_FEATURE_BYTES
            )
        except ObjectNotFound:
            return None

    def put(self, key: str, data: bytes) -> None:
        self.ctx.store.write_bytes(self.ctx.key(keys.features_key(key)), data)


def _model_spec(ctx: JobContext, request: AdaptationCreate) -> ModelSpec:
    model = request.model
    return ModelSpec(
        arch=model.arch,
        pretrained=model.pretrained,
        checkpoint=_local_model_file(model.checkpoint, ctx),
        config=_local_model_file(model.config, ctx),
        allow_download=ctx.settings.models.allow_downloads,
        download_timeout=ctx.settings.models.download_timeout_seconds,
    )


def _start_instant(
    ctx: JobContext,
    request: AdaptationCreate,
    staged: StagedImages,
    spec: ModelSpec,
    labelled: Labelled | None,
) -> InstantRun:
    return start_instant(
        staged.paths,
        request.class_names,
        model=spec,
        templates=request.templates,
        config=MustConfig.from_dict(request.hparams or {}),
        device=ctx.device,
        descriptions=request.class_descriptions,
        cache=StoreFeatureCache(ctx),
        labelled=labelled,
    )


def _warm_head(
    ctx: JobContext,
    request: AdaptationCreate,
    staged: StagedImages,
    spec: ModelSpec,
    labelled: Labelled | None,
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """For `warm_start: "instant"`: the instant head if the guard accepts it, and what happened."""
    if request.warm_start != INSTANT:
        return None, None
    # The instant run takes the request's seed and guard settings; MUST's own fields are not its.
    instant_hparams = {k: v for k, v in (request.hparams or {}).items() if k in INSTANT_HPARAM_NAMES}
    run = _start_instant(ctx, request.model_copy(update={"hparams": instant_hparams}), staged, spec, labelled)
    run.train(hooks=TrainerHooks(should_cancel=make_cancel_check(ctx.job_id, ctx.session_factory)))
    decision = run.choose()
    used = decision.served == INSTANT
    report = {"method": INSTANT, "used": used, "reason": decision.reason, "guard": decision.to_dict()}
    log.info("job %s: warm start from the instant head %s", ctx.job_id, "used" if used else "not used")
    return (run.head if used else None), report


def _start(ctx: JobContext, request: AdaptationCreate, staged: StagedImages) -> Run:
    """Set the job's method up: for MUST, load the CLIP, build the zero-shot head, fit the views,
    pick the threshold and score zero-shot; for the instant method, load the CLIP and its head.

    A MUST job that already has a checkpoint (local or in the store) trains on the views it chose then.
    """
    _begin_start(ctx)
    spec = _model_spec(ctx, request)
    labelled = _stage_labelled(ctx, request)
    if request.method == INSTANT:
        return _start_instant(ctx, request, staged, spec, labelled)
    head, warm = _warm_head(ctx, request, staged, spec, labelled)
    run = _start_engine(ctx, request, staged, spec=spec, labelled=labelled, initial_head=head)
    run.warm_start = warm
    return run


def _begin_start(ctx: JobContext) -> None:
    """Enter the zero-shot phase and bring the stored checkpoint to the local folder, if newer."""
    ctx.set_phase(JobPhase.SCORING_ZERO_SHOT)
    _restore_checkpoint(ctx, _checkpoint_dir(ctx))


def _start_engine(
    ctx: JobContext,
    request: AdaptationCreate,
    staged: StagedImages,
    *,
    spec: ModelSpec | None = None,
    labelled: Labelled | None = None,
    initial_head: torch.Tensor | None = None,
) -> Adaptation:
    """MUST's `start` for this job's request, on the images staged and the local checkpoint."""
    hparams = {"checkpoint_every": ctx.settings.worker.checkpoint_every, **(request.hparams or {})}
    return start(
        staged.paths,
        request.class_names,
        model=spec or _model_spec(ctx, request),
        templates=request.templates,
        config=MustConfig.from_dict(hparams),
        device=ctx.device,
        checkpoint_dir=_checkpoint_dir(ctx),
        descriptions=request.class_descriptions,
        initial_head=initial_head,
        labelled=labelled,
    )


def _checkpoint_dir(ctx: JobContext) -> Path:
    folder = ctx.work_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remote_pointer(ctx: JobContext) -> dict[str, Any] | None:
    """The job's `latest.json` in the artifacts store, or None before its first checkpoint."""
    try:
        data = ctx.store.read_bytes(
            ctx.key(keys.latest_checkpoint_key(ctx.job_id)), max_bytes=MAX_POINTER_BYTES
        )
    except ObjectNotFound:
        return None
    try:
        pointer = json.loads(data)
        return {
            "step": int(pointer["step"]),
            "weights": str(pointer["weights"]),
            "state": str(pointer["state"]),
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the job's checkpoint pointer is unreadable: {exc}") from exc


def _restore_checkpoint(ctx: JobContext, checkpoint_dir: Path) -> None:
    """Download the newest stored checkpoint unless the local folder already holds one as new."""
    pointer = _remote_pointer(ctx)
    if pointer is None:
        return
    local = read_latest(checkpoint_dir)
    if local is not None and int(local["step"]) >= pointer["step"]:
        return
    for name in (pointer["weights"], pointer["state"]):
        # checkpoint_key refuses names with `/` or `..`, so a pointer cannot reach outside the folder.
        ctx.store.download_file(ctx.key(keys.checkpoint_key(ctx.job_id, name)), checkpoint_dir / name)
    # The pointer goes last, as in the store: a crash mid-download leaves the old local state valid.
    tmp = checkpoint_dir / f".{LATEST}.part"
    tmp.write_text(json.dumps(pointer))
    os.replace(tmp, checkpoint_dir / LATEST)
    log.info("job %s: restored the checkpoint of step %d", ctx.job_id, pointer["step"])


def _publish_metrics(ctx: JobContext) -> None:
    """Write the job's metric history so far to `metrics.jsonl` beside its checkpoints."""
    with ctx.session_factory() as session:
        rows = repository.list_metrics(session, ctx.job_id, limit=MAX_METRIC_ROWS)
        lines = [
            json.dumps({"step": row.step, "time": row.created_at.isoformat(), **row.values}) for row in rows
        ]
    body = "".join(f"{line}\n" for line in lines).encode()
    ctx.store.write_bytes(ctx.key(keys.metrics_key(ctx.job_id)), body)


def _publish_checkpoint(ctx: JobContext, files: CheckpointFiles, lost: threading.Event) -> None:
    """Upload a checkpoint (weights, state, then latest.json) and the metrics, and record where it is."""
    if lost.is_set():
        # Another worker may own the job now; an older latest.json must not replace its newer one.
        return
    publish(ctx.store, [(ctx.key(keys.checkpoint_key(ctx.job_id, p.name)), p) for p in files.publish_order()])
    _publish_metrics(ctx)
    with ctx.session_factory() as session:
        latest = ctx.store.uri(ctx.key(keys.latest_checkpoint_key(ctx.job_id)))
        repository.update_progress(session, ctx.job_id, owner=ctx.owner, checkpoint_uri=latest)
    prune_checkpoints(ctx.store, ctx.store_prefix, ctx.job_id, ctx.settings.worker.keep_checkpoints)
    ctx.store_logs()


def _train(ctx: JobContext, run: Run, lost: threading.Event) -> FitResult:
    """Resume from the stored checkpoint if any, then train, publishing every checkpoint."""
    ctx.set_phase(JobPhase.TRAINING)
    checkpoint_dir = _checkpoint_dir(ctx)
    worker = ctx.settings.worker
    cancel_requested = make_cancel_check(ctx.job_id, ctx.session_factory)
    hooks = TrainerHooks(
        on_step=make_progress_reporter(
            ctx.job_id,
            ctx.session_factory,
            worker.progress_every_seconds,
            owner=ctx.owner,
            lease_seconds=worker.lease_seconds,
        ),
        on_checkpoint=lambda files: _publish_checkpoint(ctx, files, lost),
        # A lost lease stops the run like a cancellation, but the pipeline then records nothing.
        should_cancel=lambda: lost.is_set() or cancel_requested(),
    )
    return run.train(checkpoint_dir, hooks)


def _export(
    ctx: JobContext, request: AdaptationCreate, run: Run, result: FitResult, staged: StagedImages
) -> Manifest:
    """Export the classifier the guard chose and publish its weights, then its manifest."""
    ctx.set_phase(JobPhase.EXPORTING)
    out_dir = ctx.work_dir / "classifier"
    # Name the model as the request did, not by the local copy a download left in the work folder.
    source = {
        **run.prepared.source_model(),
        "checkpoint": request.model.checkpoint,
        "config": request.model.config,
    }
    manifest = run.export(out_dir, result, staged.skipped, source_model=source)
    _publish_classifier(ctx, out_dir)
    return manifest


def _publish_classifier(ctx: JobContext, out_dir: Path) -> None:
    """Upload the weights, then the manifest whose presence marks the classifier complete."""
    weights = (ctx.key(keys.classifier_weights_key(ctx.job_id)), out_dir / WEIGHTS)
    publish(ctx.store, [weights, (ctx.key(keys.classifier_manifest_key(ctx.job_id)), out_dir / MANIFEST)])


def _evaluate(
    ctx: JobContext, run: Run, manifest: Manifest, eval_set: LabelledImages | None
) -> dict[str, Any] | None:
    """Score the candidates on the labelled set and add the scores to the published manifest.

    After the export: the labels cannot change what is served. The manifest is written again
    (same weights and sha256), so it carries the scores as the job does.
    """
    if eval_set is None:
        return None
    ctx.set_phase(JobPhase.EVALUATING)
    report = run.evaluate(eval_set.paths, eval_set.labels)
    manifest.metrics["evaluation"] = report
    body = json.dumps(manifest.__dict__, indent=1, sort_keys=True).encode()
    ctx.store.write_bytes(ctx.key(keys.classifier_manifest_key(ctx.job_id)), body)
    top1 = ", ".join(f"{name} {score['top1']:.1f}%" for name, score in report["candidates"].items())
    log.info("job %s: eval set top-1: %s", ctx.job_id, top1)
    return report


def _run(ctx: JobContext, lost: threading.Event) -> bool:
    """Every phase of the job, ending with the job marked succeeded (True: it went back to the queue).

    A job asking for several GPUs trains in torchrun's processes (see `worker.ranks`) once its
    images are staged here.
    """
    request = _read_request(ctx)
    _check_weights(ctx, request)
    staged = _stage_dataset(ctx, request)
    eval_set = _stage_eval_set(ctx, request)
    if request.resources is not None and request.resources.gpus > 1:
        _begin_start(ctx)
        return _run_ranks(ctx, request, staged, eval_set, lost)
    run = _start(ctx, request, staged)
    result = _train(ctx, run, lost)
    _finish(ctx, request, run, result, staged, eval_set)
    return False


def _run_ranks(
    ctx: JobContext,
    request: AdaptationCreate,
    staged: StagedImages,
    eval_set: LabelledImages | None,
    lost: threading.Event,
) -> bool:
    """Train on the GPUs the request asks for, one process each started by torchrun, whose rank 0
    records the job's end; True: the job went back to the queue.

    The stored checkpoint and the model files are fetched here first, so the ranks find them local.
    """
    gpus = request.resources.gpus if request.resources else 1
    _local_model_file(request.model.checkpoint, ctx)
    _local_model_file(request.model.config, ctx)
    path = write_plan(ctx.work_dir / "ranks" / "plan.json", _plan(ctx, staged, eval_set))
    restarts = ctx.settings.worker.rank_restarts
    for attempt in range(restarts + 1):
        code = launch_ranks(gpus, path, lost)
        ended = _after_ranks(ctx, lost)
        if ended is not None:
            return ended
        log.warning(
            "job %s: its %d processes stopped (exit code %d), attempt %d", ctx.job_id, gpus, code, attempt
        )
    latest = read_latest(_checkpoint_dir(ctx))
    where = f"its last checkpoint is at step {latest['step']}" if latest else "it wrote no checkpoint"
    raise DistributedRunError(
        f"the job's {gpus} training processes stopped (torchrun exit code {code}; started {restarts + 1} "
        f"times); {where}; the job's log has their errors"
    )


def _plan(ctx: JobContext, staged: StagedImages, eval_set: LabelledImages | None) -> dict[str, Any]:
    """What each rank needs to rebuild this job's context (read back by `worker.ranks`)."""
    labelled = None
    if eval_set is not None:
        labelled = {"paths": [str(p) for p in eval_set.paths], "labels": eval_set.labels}
    return {
        "job_id": ctx.job_id,
        "owner": ctx.owner,
        "work_root": str(ctx.work_dir.parent),
        "settings": ctx.settings.model_dump(mode="json"),
        "staged": {"paths": [str(p) for p in staged.paths], "keys": staged.keys, **staged.skipped.to_dict()},
        "eval": labelled,
    }


def _after_ranks(ctx: JobContext, lost: threading.Event) -> bool | None:
    """How the ranks left the job: ended (False: rank 0 recorded it, or the lease went elsewhere),
    back in the queue (True), or None: still running here, the processes stopped midway."""
    if lost.is_set():
        return False
    with ctx.session_factory() as session:
        status = repository.get_job(session, ctx.job_id).status
    if status == JobStatus.RUNNING:
        return None
    return status == JobStatus.QUEUED


def run_rank(
    ctx: JobContext, staged: StagedImages, eval_set: LabelledImages | None, lost: threading.Event
) -> bool:
    """One rank's part of a multi-GPU job (see `worker.ranks`): every rank trains, rank 0 also finishes."""
    request = _read_request(ctx)
    run = _start_engine(ctx, request, staged)
    result = _train(ctx, run, lost)
    if ctx.main:
        _finish(ctx, request, run, result, staged, eval_set)
    return False


def _finish(
    ctx: JobContext,
    request: AdaptationCreate,
    run: Adaptation,
    result: FitResult,
    staged: StagedImages,
    eval_set: LabelledImages | None,
) -> None:
    """Export, evaluate, publish the metrics and mark the job succeeded."""
    manifest = _export(ctx, request, run, result, staged)
    evaluation = _evaluate(ctx, run, manifest, eval_set)
    _publish_metrics(ctx)
    # The folder holding weights and manifest (no trailing `/`: local stores refuse empty key parts).
    artifact = ctx.store.uri(ctx.key(keys.adaptation_prefix(ctx.job_id) + "classifier"))
    decision = run.decision
    outcome = {
        **(decision.to_dict() if decision else {}),
        "method": request.method,
        "warm_start": getattr(run, "warm_start", None),
        "views": run.views.to_dict() if run.views else None,
        "threshold": run.threshold,
        "predictions": manifest.metrics.get("predictions"),
        # Not part of the public Outcome: the dashboard's thumbnails are read by these keys.
        "samples": class_samples(run, staged),
    }
    with ctx.session_factory() as session:
        repository.mark_succeeded(
            session,
            ctx.job_id,
            artifact_uri=artifact,
            artifact_sha256=manifest.weights_sha256,
            owner=ctx.owner,
            served=manifest.network,
            outcome=outcome,
            evaluation=evaluation,
        )
    log.info("job %s succeeded: serves %s (%s)", ctx.job_id, manifest.network, outcome.get("reason", ""))


def public_message(ctx: JobContext, exc: BaseException) -> str:
    """What the job's error says to clients: the engine's or core's own message without the
    worker's folders; for anything unexpected (a database error quoting its SQL, a library's
    internals) only its type, the rest stays in the stored traceback and the worker's log."""
    if isinstance(exc, MustError | DomainError):
        return str(exc).replace(str(ctx.work_dir), "<job files>")
    return f"internal error ({type(exc).__name__}); the worker's log has the details of job {ctx.job_id}"


def _fail(ctx: JobContext, exc: BaseException, tb: str | None) -> None:
    """Record the failure; `tb` only for unexpected errors, where the stack is what helps."""
    with ctx.session_factory() as session:
        repository.mark_failed(
            session,
            ctx.job_id,
            error_type=type(exc).__name__,
            message=public_message(ctx, exc),
            traceback=tb,
            owner=ctx.owner,
        )
    log.warning("job %s failed: %s: %s", ctx.job_id, type(exc).__name__, exc)


def _cancelled(ctx: JobContext, lost: threading.Event) -> None:
    """Record the cancellation (its checkpoint is already published), unless the lease was lost."""
    if lost.is_set():
        log.warning("job %s: lease lost to another worker or the reconciler; stopped", ctx.job_id)
        return
    with ctx.session_factory() as session:
        repository.mark_cancelled(session, ctx.job_id, owner=ctx.owner)
    log.info("job %s cancelled", ctx.job_id)


def _requeue_or_fail(ctx: JobContext, lost: threading.Event, exc: StorageUnavailable) -> bool:
    """After the store stayed away through the retries: back to the queue, or failed past the limit."""
    if lost.is_set():
        return False
    if requeue_after_outage(
        ctx.session_factory, ctx.job_id, owner=ctx.owner, settings=ctx.settings, reason=str(exc)
    ):
        return True
    _fail(ctx, exc, None)
    return False


def job_context(
    job_id: str,
    session_factory: sessionmaker[Session],
    settings: Settings,
    device: torch.device | str | None,
    worker_id: str,
    work_dir: Path | None,
) -> JobContext:
    store, prefix = open_store(settings.storage.artifacts_uri, settings, create=True)
    return JobContext(
        job_id=job_id,
        owner=worker_id,
        settings=settings,
        session_factory=session_factory,
        work_dir=(work_dir or default_work_dir()) / job_id,
        store=RetryingStore(store, settings.worker.storage_retry_seconds),
        store_prefix=prefix,
        device=torch.device(device) if device is not None else default_device(),
    )


def available_gpus(settings: Settings, count: Callable[[], int] = torch.cuda.device_count) -> int:
    """GPUs this worker gives one job: the setting, else `count()` (the CUDA devices it sees); at
    least 1 (a CPU worker runs one-GPU jobs on its CPU)."""
    return max(settings.worker.gpus if settings.worker.gpus is not None else count(), 1)


def _fits(job_id: str, session_factory: sessionmaker[Session], settings: Settings) -> bool:
    """Whether this worker has the GPUs the job asks for (a missing job is `_acquire`'s to report)."""
    try:
        with session_factory() as session:
            wanted = requested_gpus(repository.get_job(session, job_id).request)
    except JobNotFound:
        return True
    if wanted <= available_gpus(settings):
        return True
    log.warning(
        "job %s asks for %d GPUs, this worker has %d: not taken, sent to its queue again",
        job_id,
        wanted,
        available_gpus(settings),
    )
    return False


def run_training_job(
    job_id: str,
    *,
    session_factory: sessionmaker[Session],
    settings: Settings,
    device: torch.device | str | None = None,
    worker_id: str,
    work_dir: Path | None = None,
) -> bool:
    """Run one job to a terminal state; return quietly if another worker holds it or it is finished.

    Engine errors fail the job with their message; anything else also fails it (with the
    traceback) and is re-raised for the task runner to log. True means the object store stayed
    unreachable and the job went back to the queue, or that the job needs more GPUs than this worker
    has and was not taken: either way the caller sends its message again (to the job's queue).
    """
    if not _fits(job_id, session_factory, settings):
        return True  # a message on the wrong queue: the caller sends it to the job's own queue
    if not _acquire(job_id, session_factory, settings, worker_id):
        return False
    ctx = job_context(job_id, session_factory, settings, device, worker_id, work_dir)
    worker = settings.worker
    lease = keep_lease(
        job_id,
        session_factory,
        owner=worker_id,
        heartbeat_seconds=worker.heartbeat_seconds,
        lease_seconds=worker.lease_seconds,
    )
    with collect_job_logs(job_id) as ctx.logs, lease as lost:
        try:
            return guarded(ctx, lost, lambda: _run(ctx, lost))
        finally:
            # Checkpoints live in the artifacts store, so the local cache is only worth its disk space
            # until the job stops; a killed process never gets here and a resume reuses its downloads.
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
            ctx.store_logs(final=True)


def guarded(
    ctx: JobContext, lost: threading.Event, body: Callable[[], bool], *, record_unexpected: bool = True
) -> bool:
    """Run `body`, recording how the job ended when it raises; True: the job went back to the queue.

    Engine errors fail the job with their message; anything else fails it with the traceback
    (unless `record_unexpected` is False) and is re-raised.
    """
    try:
        return body()
    except Cancelled:
        _cancelled(ctx, lost)
    except StorageUnavailable as exc:
        return _requeue_or_fail(ctx, lost, exc)
    except MustError as exc:
        _fail(ctx, exc, None)
    except Exception as exc:
        if record_unexpected:
            _fail(ctx, exc, traceback.format_exc())
        raise
    return False
