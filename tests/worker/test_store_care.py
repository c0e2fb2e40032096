"""Checkpoint retention: finished jobs lose their checkpoints after N days and keep their classifier."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.db.models import Job
from services.db.types import utcnow
from services.jobs import repository
from services.storage import keys
from services.storage.base import ObjectStore
from services.storage.local import LocalObjectStore
from services.storage.s3 import S3ObjectStore
from tests.worker.conftest import create_job, tiny_request
from worker.reconcile import start_reconciler
from worker.store_care import expire_checkpoints

PREFIX = "platform"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The artifacts store: a local folder, then a bucket on the moto S3 server."""
    if request.param == "local":
        (tmp_path / "store").mkdir()
        return LocalObjectStore(tmp_path / "store")
    return S3ObjectStore(request.getfixturevalue("s3_client"), request.getfixturevalue("bucket"))


def _job_with_files(
    session_factory: sessionmaker[Session], store: ObjectStore, *, finished_days_ago: float | None
) -> str:
    """A job with a checkpoint, a classifier and metrics stored; finished that long ago (None: running)."""
    job_id = create_job(session_factory, tiny_request("file:///data"))
    for name in (
        keys.checkpoint_key(job_id, "step-000002.safetensors"),
        keys.latest_checkpoint_key(job_id),
        keys.classifier_weights_key(job_id),
        keys.classifier_manifest_key(job_id),
        keys.metrics_key(job_id),
    ):
        store.write_bytes(keys.join_key(PREFIX, name), b"x")
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=600)
        latest = store.uri(keys.join_key(PREFIX, keys.latest_checkpoint_key(job_id)))
        repository.update_progress(session, job_id, owner="w", checkpoint_uri=latest)
        if finished_days_ago is not None:
            repository.mark_succeeded(session, job_id, artifact_uri="x", artifact_sha256="0" * 64, owner="w")
            finished = utcnow() - timedelta(days=finished_days_ago)
            session.execute(update(Job).where(Job.id == job_id).values(finished_at=finished))
            session.commit()
    return job_id


def _files(store: ObjectStore, job_id: str) -> set[str]:
    folder = keys.join_key(PREFIX, keys.adaptation_prefix(job_id))
    return {info.key[len(folder) :] for info in store.iter_keys(folder)}


CLASSIFIER_AND_METRICS = {"classifier/model.safetensors", "classifier/manifest.json", "metrics.jsonl"}
EVERYTHING = CLASSIFIER_AND_METRICS | {"checkpoints/step-000002.safetensors", "checkpoints/latest.json"}


def test_old_finished_jobs_lose_their_checkpoints_only(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    old = _job_with_files(session_factory, store, finished_days_ago=8)
    recent = _job_with_files(session_factory, store, finished_days_ago=2)
    running = _job_with_files(session_factory, store, finished_days_ago=None)

    expired = expire_checkpoints(session_factory, store, PREFIX, retention_days=7)

    assert expired == [old]
    assert _files(store, old) == CLASSIFIER_AND_METRICS
    assert _files(store, recent) == EVERYTHING
    assert _files(store, running) == EVERYTHING
    with session_factory() as session:
        assert repository.get_job(session, old).checkpoint_uri is None
        assert repository.get_job(session, recent).checkpoint_uri is not None
    # Done once: the next pass finds nothing to do.
    assert expire_checkpoints(session_factory, store, PREFIX, retention_days=7) == []


def test_the_reconciler_runs_the_retention_pass(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path)
    old = _job_with_files(session_factory, store, finished_days_ago=1)
    stop = threading.Event()

    def chore() -> Any:
        return expire_checkpoints(session_factory, store, PREFIX, retention_days=0.5)

    thread = start_reconciler(session_factory, lambda *a, **k: None, 0.05, stop, housekeeping=[chore])
    deadline = time.monotonic() + 10
    while _files(store, old) != CLASSIFIER_AND_METRICS and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)

    assert _files(store, old) == CLASSIFIER_AND_METRICS
