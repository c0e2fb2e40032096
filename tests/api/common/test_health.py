"""Liveness and readiness probes of the control-plane app."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fastapi.testclient import TestClient

from api.common.health import run_checks
from api.control.main import create_app
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthz_answers_without_dependencies(client: TestClient) -> None:
    response = client.get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_is_200_when_everything_answers(client: TestClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json()["components"] == {
        name: {"status": "ok", "detail": None} for name in ("database", "broker", "artifacts_store")
    }


def test_readyz_is_503_with_an_unreachable_database(tmp_path: Path) -> None:
    # "development" skips the start-up migration, which would fail on this database first.
    db_url = f"postgresql+psycopg://nobody@127.0.0.1:{_closed_port()}/nothing"
    settings = make_settings(db_url, tmp_path, environment="development", api_keys=["test-key"])
    (tmp_path / "artifacts").mkdir()

    with TestClient(create_app(settings, queue=RecordingJobQueue())) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    components = response.json()["components"]
    assert components["database"]["status"] == "error"
    assert "OperationalError" in components["database"]["detail"]
    assert components["broker"]["status"] == components["artifacts_store"]["status"] == "ok"


def test_readyz_is_503_with_an_unreachable_broker(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, broker={"url": f"redis://127.0.0.1:{_closed_port()}/0"})

    with TestClient(create_app(settings, queue=RecordingJobQueue())) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["components"]["broker"]["status"] == "error"
    assert response.json()["components"]["database"]["status"] == "ok"


def test_readyz_checks_the_filesystem_broker_folder(sqlite_url: str, tmp_path: Path) -> None:
    broker = {"url": "filesystem://", "filesystem_folder": str(tmp_path / "broker")}
    settings = make_settings(sqlite_url, tmp_path, broker=broker)

    with TestClient(create_app(settings, queue=RecordingJobQueue())) as client:
        missing = client.get("/readyz")
        (tmp_path / "broker" / "queue").mkdir(parents=True)
        present = client.get("/readyz")

    assert missing.status_code == 503
    assert "does not exist" in missing.json()["components"]["broker"]["detail"]
    assert present.status_code == 200


def test_a_hanging_check_is_reported_at_the_deadline() -> None:
    started = time.monotonic()

    outcome = run_checks({"slow": lambda: time.sleep(2), "fast": lambda: None}, deadline_seconds=0.2)

    assert time.monotonic() - started < 1.5
    assert outcome["slow"].status == "error"
    assert outcome["fast"].status == "ok"
