"""What the worker does about its object store: prune old checkpoints, and survive outages.

- `prune_checkpoints`: after each published checkpoint, the job's older checkpoints in the
  artifacts store are deleted, keeping the newest `worker.keep_checkpoints` (the one
  `latest.json` points at is always the newest, so it is always kept).
- `expire_checkpoints`: `worker.checkpoint_retention_days` after a job finished, its checkpoints
  are deleted (its classifier, manifest and metrics stay); the reconciler runs it on every pass.
- `requeue_after_outage`: a job whose store stayed unreachable through the retries of
  `RetryingStore` goes back to the queue, to resume from its last checkpoint on the next
  attempt, at most `worker.max_storage_requeues` times; after that it fails.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.db.types import utcnow
from services.jobs import repository
from services.storage import keys
from services.storage.base import ObjectStore

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = re.compile(r"^step-(\d+)\.(safetensors|state\.json)$")


def prune_checkpoints(store: ObjectStore, prefix: str, job_id: str, keep: int) -> list[str]:
    """Delete the job's stored checkpoints older than the newest `keep`; return the deleted keys."""
    folder = checkpoint_folder(prefix, job_id)
    by_step: dict[int, list[str]] = {}
    for info in store.iter_keys(folder):
        match = _CHECKPOINT_FILE.match(info.key[len(folder) :])
        if match:
            by_step.setdefault(int(match.group(1)), []).append(info.key)
    old = sorted(by_step)[:-keep] if keep > 0 else []
    doomed = [key for step in old for key in by_step[step]]
    if doomed:
        store.delete_keys(doomed)
        log.info("job %s: deleted %d files of %d old checkpoints", job_id, len(doomed), len(old))
    return doomed


def checkpoint_folder(prefix: str, job_id: str) -> str:
    """The job's checkpoint folder in the artifacts store (with a trailing `/`)."""
    return keys.join_key(prefix, keys.checkpoint_key(job_id, "x")[: -len("x")])


def expire_checkpoints(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    prefix: str,
    *,
    retention_days: float,
    now: datetime | None = None,
) -> list[str]:
    """Delete the checkpoints of jobs that finished over `retention_days` ago; return those jobs' ids.

    A job is marked done (`checkpoint_uri` null) only after its files are gone, so a pass that
    fails halfway is finished by the next one.
    """
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with session_factory() as session:
        job_ids = repository.finished_with_checkpoints(session, finished_before=cutoff)
    for job_id in job_ids:
        deleted = store.delete_prefix(checkpoint_folder(prefix, job_id))
        with session_factory() as session:
            repository.forget_checkpoints(session, job_id)
        log.info("job %s: deleted %d checkpoint files (retention %s days)", job_id, deleted, retention_days)
    return job_ids


def requeue_after_outage(
    session_factory: sessionmaker[Session], job_id: str, *, owner: str, settings: Settings, reason: str
) -> bool:
    """Put the job back in the queue if it has requeues left; False if it should fail instead."""
    with session_factory() as session:
        job = repository.get_job(session, job_id)
        if job.storage_requeues >= settings.worker.max_storage_requeues:
            return False
        requeued = repository.requeue_running(session, job_id, owner=owner, storage_outage=True)
    if requeued:
        log.warning("job %s: object store unavailable (%s); back in the queue to resume", job_id, reason)
    return requeued
