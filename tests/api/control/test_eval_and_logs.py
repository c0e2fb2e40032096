"""The eval set checked at submit, a job's phase history and evaluation, and its worker log lines."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import repository
from services.jobs.states import JobPhase


def _eval_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "eval"
    root.mkdir()
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def _refused(client: TestClient, body: dict[str, Any]) -> str:
    answer = client.post("/adaptations", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "EvalSetError"
    detail: str = answer.json()["detail"]
    return detail


def test_eval_labels_that_are_not_class_names_are_refused(
    client: TestClient, body: dict[str, Any], tmp_path: Path
) -> None:
    root = _eval_folder(tmp_path, {"cat/1.jpg": b"x", "horse/2.jpg": b"x"})
    detail = _refused(client, body | {"eval": {"uri": root.as_uri()}})
    assert "labels that are not class names: 'horse'" in detail


def test_an_empty_eval_set_and_a_missing_manifest_are_refused(
    client: TestClient, body: dict[str, Any], tmp_path: Path
) -> None:
    root = _eval_folder(tmp_path, {"eval.csv": b"key,label\n"})
    assert "holds no labelled images" in _refused(
        client, body | {"eval": {"uri": (root / "eval.csv").as_uri()}}
    )
    missing = (root / "nope.jsonl").as_uri()
    assert "does not exist" in _refused(client, body | {"eval": {"uri": missing}})


def test_a_good_eval_manifest_is_accepted(client: TestClient, body: dict[str, Any], tmp_path: Path) -> None:
    root = _eval_folder(tmp_path, {"eval.jsonl": b'{"key": "a/1.jpg", "label": "dog"}\n'})
    answer = client.post("/adaptations", json=body | {"eval": {"uri": (root / "eval.jsonl").as_uri()}})
    assert answer.status_code == 202, answer.text


def test_a_job_shows_its_phases_and_evaluation(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job = client.post("/adaptations", json=body).json()
    assert [(p["phase"], p["ended_at"]) for p in job["phases"]] == [("queued", None)]
    assert job["evaluation"] is None
    score = {
        "top1": 50.0,
        "per_class_recall": {"cat": 1.0, "dog": 0.0},
        "confusion": [[1, 0, 0], [1, 0, 0], [0, 0, 0]],
    }
    report = {
        "images": 2,
        "class_names": ["cat", "dog", "bird"],
        "served": "teacher",
        "candidates": dict.fromkeys(("zero_shot", "teacher", "student", "served"), score),
    }
    with session_factory() as session:
        repository.mark_running(session, job["id"], owner="w", lease_seconds=60)
        repository.set_phase(session, job["id"], phase=JobPhase.TRAINING, owner="w")
        repository.mark_succeeded(
            session,
            job["id"],
            artifact_uri="s3://b/x",
            artifact_sha256="0" * 64,
            owner="w",
            evaluation=report,
        )

    done = client.get(f"/adaptations/{job['id']}").json()
    assert done["phase"] == "done"
    assert [p["phase"] for p in done["phases"]] == ["queued", "training", "done"]
    assert all(p["ended_at"] is not None for p in done["phases"])
    assert done["evaluation"] == report
    listed = client.get("/adaptations").json()["items"][0]
    assert listed["phases"] == done["phases"]


def test_logs_come_back_in_order_and_page_on(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = client.post("/adaptations", json=body).json()["id"]
    when = datetime(2026, 12, 30, 12, 0, tzinfo=UTC)
    lines = [
        {
            "created_at": when,
            "level": "INFO",
            "logger": "worker.pipeline",
            "message": f"job {job_id}: step {i}",
        }
        for i in range(3)
    ]
    with session_factory() as session:
        repository.append_log_lines(session, job_id, lines)

    page = client.get(f"/adaptations/{job_id}/logs", params={"limit": 2}).json()
    assert page["adaptation_id"] == job_id
    assert [line["message"] for line in page["items"]] == [f"job {job_id}: step {i}" for i in range(2)]
    assert page["items"][0]["level"] == "INFO"
    assert page["items"][0]["logger"] == "worker.pipeline"
    rest = client.get(f"/adaptations/{job_id}/logs", params={"after": page["items"][-1]["id"]}).json()
    assert [line["message"] for line in rest["items"]] == [f"job {job_id}: step 2"]


@pytest.mark.parametrize("job_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_logs_of_an_unknown_job_are_404(client: TestClient, job_id: str) -> None:
    assert client.get(f"/adaptations/{job_id}/logs").status_code == 404
