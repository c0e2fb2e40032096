"""The worker checks a job's request again with its own settings, and keeps internals out of errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

import worker.pipeline
from services.config import Settings
from services.jobs import repository
from services.jobs.states import JobStatus
from tests.worker.conftest import create_job, tiny_request
from worker.pipeline import run_training_job


def _run(job_id: str, session_factory: sessionmaker[Session], settings: Settings, tmp_path: Path) -> Any:
    run_training_job(
        job_id,
        session_factory=session_factory,
        settings=settings,
        device="cpu",
        worker_id="w",
        work_dir=tmp_path,
    )
    with session_factory() as session:
        return repository.get_job(session, job_id)


def test_a_stored_request_naming_local_files_fails_outside_the_embedded_mode(
    session_factory: sessionmaker[Session], sqlite_url: str, tmp_path: Path
) -> None:
    # Written straight to the database, as a request from before the rule (or from elsewhere) would be.
    job_id = create_job(session_factory, tiny_request("file:///etc/"))
    settings = Settings(environment="development", api_keys=["k"], database={"url": sqlite_url})

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.FAILED
    assert job.error_type == "ConfigError"
    assert "dataset.uri must be an s3:// URI" in job.error_message
    assert job.images_used == 0  # nothing was listed or read


def test_unexpected_errors_show_their_type_not_their_text(
    session_factory: sessionmaker[Session], sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statement = "UPDATE jobs SET total_steps=%(total_steps)s WHERE jobs.id = %(id)s"

    def database_refuses(*args: Any, **kwargs: Any) -> None:
        raise DataError(statement, {"total_steps": 2**31}, Exception("integer out of range"))

    monkeypatch.setattr(worker.pipeline, "_stage_dataset", database_refuses)
    job_id = create_job(session_factory, tiny_request(tmp_path.as_uri()))
    settings = Settings(database={"url": sqlite_url})

    with pytest.raises(DataError):
        _run(job_id, session_factory, settings, tmp_path / "work")
    with session_factory() as session:
        job = repository.get_job(session, job_id)

    assert job.status == JobStatus.FAILED
    assert job.error_type == "DataError"
    assert "UPDATE jobs" not in job.error_message
    assert "internal error (DataError)" in job.error_message
    assert "UPDATE jobs" in job.error_traceback  # kept for operators, never served
