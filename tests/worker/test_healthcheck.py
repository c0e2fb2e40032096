"""`python -m worker.healthcheck`, the worker container's health check, probes the configured port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from services.launcher import REPO_ROOT, free_port


def _check(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
    return subprocess.run(
        [sys.executable, "-m", "worker.healthcheck"],
        env=clean | env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def metrics_port() -> Iterator[int]:
    """A Prometheus endpoint on a port that is not the default 9808."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=CollectorRegistry())
    yield port
    server.shutdown()
    thread.join(timeout=5)


def test_healthy_when_the_configured_port_answers(metrics_port: int) -> None:
    result = _check(MUST_METRICS__WORKER_PORT=str(metrics_port))

    assert result.returncode == 0, result.stderr


def test_unhealthy_when_nothing_answers_on_the_configured_port() -> None:
    port = free_port()
    result = _check(MUST_METRICS__WORKER_PORT=str(port))

    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr


def test_without_a_metrics_port_it_checks_the_broker() -> None:
    reachable = _check(MUST_METRICS__WORKER_PORT="0", MUST_BROKER__URL="redis://127.0.0.1:6379/14")
    gone = _check(MUST_METRICS__WORKER_PORT="0", MUST_BROKER__URL=f"redis://127.0.0.1:{free_port()}/0")

    assert reachable.returncode == 0, reachable.stderr
    assert gone.returncode == 1
    assert "broker is unreachable" in gone.stderr
