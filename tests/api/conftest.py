"""An app per test on a fresh migrated database, with a recording queue and a local dataset folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.control.main import create_app
from services.config import Settings
from tests.api.fakes import RecordingJobQueue

# A Redis database of its own, so the tests never touch the queues of a running platform.
TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings on `db_url`, the test Redis database and a local artifacts folder under `tmp_path`."""
    values: dict[str, Any] = {
        "database": {"url": db_url},
        "broker": {"url": TEST_REDIS_URL},
        "storage": {"artifacts_uri": (tmp_path / "artifacts").as_uri()},
    }
    return Settings(**(values | overrides))


@pytest.fixture
def settings(sqlite_url: str, tmp_path: Path) -> Settings:
    """Embedded settings on a SQLite file (the app migrates it at start)."""
    return make_settings(sqlite_url, tmp_path)


@pytest.fixture
def queue() -> RecordingJobQueue:
    """The queue the app submits to."""
    return RecordingJobQueue()


@pytest.fixture
def app(settings: Settings, queue: RecordingJobQueue) -> FastAPI:
    """The control-plane app under test."""
    return create_app(settings, queue=queue)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client of the started app (lifespan run: database migrated, artifacts folder made)."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session_factory(app: FastAPI, client: TestClient) -> sessionmaker[Session]:
    """Sessions on the app's own database, to arrange state the API cannot (finished jobs, metrics)."""
    factory: sessionmaker[Session] = app.state.session_factory
    return factory


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A local dataset folder holding one file."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat-001.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


@pytest.fixture
def body(dataset_dir: Path) -> dict[str, Any]:
    """A valid adaptation request on the local dataset folder."""
    return {"class_names": ["cat", "dog", "bird"], "dataset": {"uri": dataset_dir.as_uri()}}
