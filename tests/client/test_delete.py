"""`must delete` and `MustClient.delete` against a real control API."""

from __future__ import annotations

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
