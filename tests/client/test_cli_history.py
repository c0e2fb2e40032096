"""`must metrics`, `must logs` and `must status` against the real control app (in process, SQLite)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.control.main import create_app
from client.cli import build_parser
from client.http import MustClient
from services.jobs import repository
from services.jobs.states import JobPhase
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue

CLASSES = ["cat", "dog", "bird"]
REPORT: dict[str, Any] = {
    "images": 4,
    "class_names": CLASSES,
    "served": "teacher",
    "candidates": {
        "zero_shot": {
            "top1": 50.0,
            "per_class_recall": {"cat": 1.0, "dog": 0.0},
            "confusion": [[2, 0, 0], [2, 0, 0], [0, 0, 0]],
        },
        "teacher": {
            "top1": 75.0,
            "per_class_recall": {"cat": 1.0, "dog": 0.5},
            "confusion": [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
        },
        "student": {
            "top1": 25.0,
            "per_class_recall": {"cat": 0.5, "dog": 0.0},
            "confusion": [[1, 1, 0], [0, 0, 2], [0, 0, 0]],
        },
        "served": {
            "top1": 75.0,
            "per_class_recall": {"cat": 1.0, "dog": 0.5},
            "confusion": [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
        },
    },
}


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, sessionmaker[Session]]]:
    app = create_app(make_settings(sqlite_url, tmp_path), queue=RecordingJobQueue())
    with TestClient(app) as client:
        yield client, app.state.session_factory


@pytest.fixture
def must(api: tuple[TestClient, sessionmaker[Session]]) -> Iterator[MustClient]:
    """The Python client, talking to the app in process (the test client is an httpx.Client)."""
    with MustClient("http://testserver", "http://testserver") as client:
        client.control.http.close()
        client.control.http = api[0]
        yield client


@pytest.fixture
def job_id(api: tuple[TestClient, sessionmaker[Session]], tmp_path: Path) -> str:
    """A succeeded job with an evaluation, two metric rows and two log lines."""
    client, session_factory = api
    (tmp_path / "images").mkdir()
    body = {"class_names": CLASSES, "dataset": {"uri": (tmp_path / "images").as_uri()}}
    job_id: str = client.post("/adaptations", json=body).json()["id"]
    when = datetime(2026, 12, 30, 12, 0, 5, tzinfo=UTC)
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.set_phase(session, job_id, phase=JobPhase.TRAINING, owner="w")
        repository.append_metrics(session, job_id, step=5, values={"loss": 2.5, "lr": 1e-5, "note": "x"})
        repository.append_metrics(session, job_id, step=10, values={"loss": 1.25, "lr": 2e-5})
        lines = [
            {"created_at": when, "level": "INFO", "logger": "worker.pipeline", "message": "job: training"},
            {"created_at": when, "level": "WARNING", "logger": "worker.pipeline", "message": "slow store"},
        ]
        repository.append_log_lines(session, job_id, lines)
        repository.mark_succeeded(
            session,
            job_id,
            artifact_uri="s3://b/x",
            artifact_sha256="0" * 64,
            owner="w",
            served="teacher",
            evaluation=REPORT,
        )
    return job_id


def _run(must: MustClient, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    code: int = args.run(must, args)
    return code


def test_metrics_prints_the_eval_table_and_the_history(
    must: MustClient, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(must, "metrics", job_id) == 0
    out = capsys.readouterr().out.splitlines()

    assert out[0].startswith("eval set: 4 labelled images")
    assert out[1].split() == ["CANDIDATE", "TOP-1", "%", "cat", "dog", "bird"]
    assert out[2].split() == ["zero_shot", "50.0", "1.00", "0.00", "-"]
    assert out[3].split() == ["teacher", "75.0", "1.00", "0.50", "-"]
    assert out[5].split() == ["served", "(teacher)", "75.0", "1.00", "0.50", "-"]
    assert out[7].split() == ["STEP", "LOSS", "LR"]
    assert out[8].split() == ["5", "2.5", "1e-05"]
    assert out[9].split() == ["10", "1.25", "2e-05"]


def test_metrics_json_carries_evaluation_and_history(
    must: MustClient, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(must, "metrics", job_id, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["evaluation"] == REPORT
    assert [item["step"] for item in data["items"]] == [5, 10]
    assert must.evaluation(job_id) is not None


def test_logs_prints_the_workers_lines(
    must: MustClient, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(must, "logs", job_id) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2026-12-30 12:00:05 INFO    worker.pipeline: job: training",
        "2026-12-30 12:00:05 WARNING worker.pipeline: slow store",
    ]
    assert [line.message for line in must.logs(job_id)] == ["job: training", "slow store"]
    assert must.logs(job_id, after=must.logs(job_id)[0].id)[0].message == "slow store"


def test_status_shows_the_phases_the_served_choice_and_the_eval_table(
    must: MustClient, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(must, "status", job_id) == 0
    out = capsys.readouterr().out
    assert re.search(r"phases    queued \d:\d\d:\d\d, training \d:\d\d:\d\d, done\n", out), out
    assert "serves    teacher" in out
    assert "eval set: 4 labelled images" in out
    assert "served (teacher)  75.0" in out
