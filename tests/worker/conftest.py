"""Shared pieces of the worker tests: a migrated SQLite job database and a tiny-CLIP job request."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import CLASS_NAMES, iter_domain
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory
from services.jobs import repository

NUM_IMAGES = 40


@pytest.fixture
def session_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated SQLite file."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def target_pngs() -> list[bytes]:
    """PNG bytes of the synthetic target-domain images (rendered once per test session)."""
    encoded = []
    for image, _ in iter_domain("target", NUM_IMAGES, seed=3):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def tiny_request(dataset_uri: str, **overrides: Any) -> dict[str, Any]:
    """A job request on the tiny CLIP with a 6-step schedule checkpointed every 2 steps."""
    request: dict[str, Any] = {
        "class_names": list(CLASS_NAMES),
        "dataset": {"uri": dataset_uri},
        "model": {"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH)},
        "templates": ["a photo of a {}."],
        "hparams": {"total_steps": 6, "batch_size": 8, "checkpoint_every": 2},
    }
    return request | overrides


def create_job(session_factory: sessionmaker[Session], request: dict[str, Any]) -> str:
    """Insert a queued job and return its id."""
    with session_factory() as session:
        return repository.create_job(session, request=request, idempotency_key=None).id
