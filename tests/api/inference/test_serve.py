"""The launcher's workers each listen on their own socket: connections spread, a dead worker comes back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.inference.serve import parse_args
from bench.loopback import children, running
from services.launcher import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -m api.inference.serve --workers 2` on a loopback port, with an embedded job database."""
    port = free_port()
    env = {
        "MUST_ENVIRONMENT": "embedded",
        "MUST_DATABASE__URL": f"sqlite:///{tmp_path / 'jobs.db'}",
        "MUST_STORAGE__ARTIFACTS_URI": f"file://{tmp_path / 'store'}",
        "TMPDIR": str(tmp_path),
    }
    args = [sys.executable, "-m", "api.inference.serve", "--port", str(port), "--workers", "2"]
    args += ["--log-level", "warning"]
    with running(args, f"http://127.0.0.1:{port}/healthz", env, tmp_path / "serve.log") as proc:
        _wait_for_workers(proc.pid, port, 2)
        yield proc, port


def _listening_workers(pid: int, port: int) -> list[int]:
    """The supervisor's children that hold a socket listening on `port`."""
    listening = _inodes(port, state="0A")
    return [child for child in children(pid) if _socket_inodes(child) & listening]


def _wait_for_workers(pid: int, port: int, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(_listening_workers(pid, port)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} workers listen on port {port}")
        time.sleep(0.2)


def _inodes(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets with local port `port` in `state` (0A: listening, 01: established)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            found.add(int(fields[9]))
    return found


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def test_a_burst_of_connections_is_spread_over_the_workers(
    service: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = service
    workers = _listening_workers(proc.pid, port)
    # Opened at once, as a client's pool does; each one asks once and stays open.
    connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
    try:
        for connection in connections:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for connection in connections:
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        established = _inodes(port, state="01")
        held = [len(_socket_inodes(worker) & established) for worker in workers]
    finally:
        for connection in connections:
            connection.close()

    assert sum(held) == 32
    # By a hash of the addresses: each worker holds some (all on one: chance about 1 in 2**31).
    assert min(held) >= 4, held


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_all(
    service: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = service
    first, second = _listening_workers(proc.pid, port)

    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        workers = _listening_workers(proc.pid, port)
        if len(workers) == 2 and first not in workers:
            break
        assert time.monotonic() < deadline, "the dead worker was not replaced"
        time.sleep(0.2)
    assert second in workers

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not children(proc.pid)


def test_the_workers_stop_when_the_supervisor_is_killed(
    service: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = service
    workers = _listening_workers(proc.pid, port)

    proc.kill()
    proc.wait(timeout=10)

    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_default_to_web_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert parse_args([]).workers == 3
    assert parse_args(["--workers", "1", "--no-proxy-headers"]).proxy_headers is False
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])
