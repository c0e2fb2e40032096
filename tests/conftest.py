"""Shared fixtures: real PostgreSQL databases, SQLite files and a real S3-compatible server (moto)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Maintenance database used to create and drop one throw-away database per test.
PG_ADMIN_URL = os.environ.get("MUST_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin_connect() -> Any:
    """An autocommit connection to the maintenance DB (CREATE/DROP DATABASE cannot run in a transaction)."""
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at {PG_ADMIN_URL} ({exc}); set MUST_TEST_PG_ADMIN_URL")


@contextmanager
def _pg_database() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh, uniquely named PostgreSQL database, dropped afterwards."""
    from sqlalchemy.engine import make_url

    name = f"must_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            make_url(PG_ADMIN_URL)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with _pg_admin_connect() as conn:
            # FORCE ends connections a test forgot to close (PostgreSQL >= 13).
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    with _pg_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL of a SQLite file in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'must.db'}"


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a real S3-compatible HTTP server (moto_server) for this test session."""
    from bench.loopback import free_port, running

    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip("moto_server is not installed: pip install 'moto[server]'")
    endpoint = f"http://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        port = endpoint.rsplit(":", 1)[1]
        with running([str(server), "-H", "127.0.0.1", "-p", port], endpoint, {}, log):
            yield endpoint


@pytest.fixture
def s3_client(moto_s3: str) -> Any:
    """A boto3 S3 client on the moto server, built the way the platform builds its clients."""
    from services.config import StorageSettings
    from services.storage.s3 import make_s3_client

    return make_s3_client(StorageSettings(artifacts_uri="s3://must-artifacts", s3_endpoint_url=moto_s3))


@pytest.fixture
def bucket(s3_client: Any) -> Iterator[str]:
    """A uniquely named, empty bucket; emptied and removed after the test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
        objects = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if objects:
            s3_client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def stack(moto_s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The whole platform (control API, inference, a worker process) on PostgreSQL, Redis and moto S3.

    One per test session: starting it costs seconds, and tests use their own prefixes and jobs.
    """
    import redis

    from services.config import StorageSettings
    from services.storage.s3 import make_s3_client
    from tests.stack import BROKER_URL, running_stack

    try:
        redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis is unreachable at {BROKER_URL}: {exc}")
    s3 = make_s3_client(StorageSettings(artifacts_uri="s3://must-artifacts", s3_endpoint_url=moto_s3))
    root = tmp_path_factory.mktemp("stack")
    with (
        _pg_database() as db_url,
        running_stack(
            db_url=db_url, s3_endpoint=moto_s3, s3=s3, log_dir=root / "logs", work_dir=root / "work"
        ) as running,
    ):
        yield running
