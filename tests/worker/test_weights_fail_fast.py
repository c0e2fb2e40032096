"""A default ViT-B-32/openai job on a machine without its weights fails before listing any image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from sqlalchemy.orm import Session, sessionmaker

import worker.pipeline
from services.config import DatabaseSettings, Settings, StorageSettings
from services.jobs import repository
from services.jobs.states import JobPhase, JobStatus
from tests.worker.conftest import create_job
from worker.pipeline import run_training_job


def test_missing_pretrained_weights_fail_the_job_at_once_with_what_to_do(
    session_factory: sessionmaker[Session], sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    staged: list[Any] = []
    monkeypatch.setattr(worker.pipeline, "stage_images", lambda *a, **k: staged.append(a))
    (tmp_path / "images").mkdir()
    settings = Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=(tmp_path / "store").as_uri()),
    )
    request = {"class_names": ["cat", "dog"], "dataset": {"uri": (tmp_path / "images").as_uri()}}
    job_id = create_job(session_factory, request)  # the default model: ViT-B-32, pretrained openai

    run_training_job(
        job_id,
        session_factory=session_factory,
        settings=settings,
        device="cpu",
        worker_id="w",
        work_dir=tmp_path,
    )

    with session_factory() as session:
        job = repository.get_job(session, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error_type == "WeightsUnavailable"
    message = str(job.error_message)
    assert "the weights of ViT-B-32 (openai)" in message
    assert "MUST_MODELS__ALLOW_DOWNLOADS" in message
    assert 'model.checkpoint with model.arch "ViT-B-32-quickgelu"' in message
    assert staged == []
    assert job.phase == JobPhase.QUEUED  # it failed before listing began
