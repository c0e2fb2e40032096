"""Migrations apply on SQLite and PostgreSQL, match the models, and the models round-trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from services.db.base import Base
from services.db.migrate import alembic_config, downgrade, upgrade
from services.db.models import Job, JobMetric
from services.db.session import make_engine, make_session_factory
from services.jobs.states import JobPhase, JobStatus

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test runs once on SQLite and once on a fresh PostgreSQL database."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


def test_upgrade_matches_models_and_downgrades(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
            assert MigrationContext.configure(conn).get_current_revision() == head
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        downgrade(db_url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_models_round_trip_json_and_aware_times(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    request = {
        "class_names": ["chat", "chien", "鳥"],
        "hparams": {"lr": 2e-5, "epochs": None},
        "tags": [1, 2],
    }
    local = timezone(timedelta(hours=2))
    started = datetime(2026, 1, 2, 12, 0, 0, 123456, tzinfo=local)
    try:
        with make_session_factory(engine)() as session:
            job = Job(request=request, num_classes=3, phase=JobPhase.TRAINING, started_at=started)
            job.skipped_reasons = {"not_an_image": 2}
            session.add(job)
            session.flush()
            session.add(JobMetric(job_id=job.id, step=10, values={"loss": 1.5, "conf": [0.1, 0.9]}))
            session.commit()
            job_id = job.id
        with make_session_factory(engine)() as session:
            loaded = session.get_one(Job, job_id)
            assert loaded.request == request
            assert loaded.status is JobStatus.QUEUED
            assert loaded.phase is JobPhase.TRAINING
            assert loaded.skipped_reasons == {"not_an_image": 2}
            assert loaded.started_at == started
            assert loaded.started_at.tzinfo == UTC
            assert loaded.created_at.tzinfo == UTC
            metric = session.query(JobMetric).filter_by(job_id=job_id).one()
            assert metric.values == {"loss": 1.5, "conf": [0.1, 0.9]}
    finally:
        engine.dispose()


def test_naive_datetimes_are_refused(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            session.add(Job(request={}, started_at=datetime(2026, 1, 1)))
            with pytest.raises(Exception, match="naive datetime"):
                session.commit()
    finally:
        engine.dispose()


def test_alembic_ini_reads_url_from_settings(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUST_DATABASE__URL", sqlite_url)
    command.upgrade(Config(str(REPO_ROOT / "alembic.ini")), "head")
    engine = make_engine(sqlite_url)
    try:
        assert {"jobs", "job_metrics"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
