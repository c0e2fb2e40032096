"""`must delete`, `must download` and their client methods against a real control API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from client.cli import EXIT_OK, EXIT_REFUSED, main
from client.http import Conflict, MustClient, NotFound
from services.jobs import repository
from services.storage import keys
from tests.client.conftest import ControlServer


def test_must_delete_removes_the_job_and_a_second_delete_exits_3(
    control_server: ControlServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with MustClient(control_server.url) as must:
        job = must.adapt(control_server.dataset.as_uri(), ["cat", "dog"])
    key = keys.join_key(control_server.prefix, keys.metrics_key(job.id))
    control_server.store.write_bytes(key, b"{}\n")

    code = main(["--api-url", control_server.url, "delete", job.id])

    assert (code, capsys.readouterr().out) == (EXIT_OK, f"{job.id}: deleted\n")
    assert not control_server.store.exists(key)
    again = main(["--api-url", control_server.url, "delete", job.id])
    assert again == EXIT_REFUSED
    assert "does not exist" in capsys.readouterr().err


def test_the_client_raises_conflict_for_a_running_job(control_server: ControlServer) -> None:
    with MustClient(control_server.url) as must:
        job = must.adapt(control_server.dataset.as_uri(), ["cat", "dog"])
        with control_server.session_factory() as session:
            repository.mark_running(session, job.id, owner="w", lease_seconds=60)

        with pytest.raises(Conflict, match="cancel it first"):
            must.delete(job.id)
        with control_server.session_factory() as session:
            repository.mark_failed(session, job.id, error_type="E", message="stopped")
        must.delete(job.id)
        with pytest.raises(NotFound):
            must.get(job.id)


def _succeeded_with_files(server: ControlServer, weights: bytes, *, sha: str | None = None) -> str:
    with MustClient(server.url) as must:
        job_id = must.adapt(server.dataset.as_uri(), ["cat", "dog"]).id
    server.store.write_bytes(keys.join_key(server.prefix, keys.classifier_weights_key(job_id)), weights)
    server.store.write_bytes(keys.join_key(server.prefix, keys.classifier_manifest_key(job_id)), b"{}")
    with server.session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        digest = sha or hashlib.sha256(weights).hexdigest()
        repository.mark_succeeded(session, job_id, artifact_uri="x", artifact_sha256=digest, owner="w")
    return job_id


def test_must_download_writes_both_files_checked_against_their_sha256(
    control_server: ControlServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = b"weights" * 5000
    job_id = _succeeded_with_files(control_server, weights)

    code = main(["--api-url", control_server.url, "download", job_id, str(tmp_path / "out")])

    assert code == EXIT_OK, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "out" / "manifest.json").read_bytes() == b"{}"
    assert hashlib.sha256(weights).hexdigest() in capsys.readouterr().out


def test_a_download_whose_bytes_do_not_match_leaves_no_file(
    control_server: ControlServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _succeeded_with_files(control_server, b"tampered", sha="0" * 64)

    out = tmp_path / "out"
    code = main(["--api-url", control_server.url, "download", job_id, str(out), "--via-api"])

    assert code != EXIT_OK
    assert "expected 0000" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == []
