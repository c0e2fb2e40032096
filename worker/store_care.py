"""What the worker does about its object store: prune old checkpoints, and survive outages.

- `prune_checkpoints`: after each published checkpoint, the job's older checkpoints in the
  artifacts store are deleted, keeping the newest `worker.keep_checkpoints` (the one
  `latest.json` points at is always the newest, so it is always kept).
- `requeue_after_outage`: a job whose store stayed unreachable through the retries of
  `RetryingStore` goes back to the queue, to resume from its last checkpoint on the next
  attempt, at most `worker.max_storage_requeues` times; after that it fails.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.jobs import repository
from services.storage import keys
from services.storage.base import ObjectStore

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = re.compile(r"^step-(\d+)\.(safetensors|state\.json)$")


def prune_checkpoints(store: ObjectStore, prefix: str, job_id: str, keep: int) -> list[str]:
    """Delete the job's stored checkpoints older than the newest `keep`; return the deleted keys."""
    folder = keys.join_key(prefix, keys.checkpoint_key(job_id, "x")[: -len("x")])
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
