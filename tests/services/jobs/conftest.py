"""Migrated databases for the repository tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory


def _migrated_factory(url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def session_factory(request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated SQLite file, then on a migrated PostgreSQL database."""
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    yield from _migrated_factory(url)


@pytest.fixture
def pg_session_factory(pg_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated PostgreSQL database only (for races)."""
    yield from _migrated_factory(pg_url)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session on the parametrized database."""
    with session_factory() as s:
        yield s
