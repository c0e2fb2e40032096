"""Servers the benches start on loopback ports: the inference service under uvicorn, and moto's S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.launcher import free_port, stop_process

# Credentials moto accepts; set for the S3 clients of the bench process and its children.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Return once `url` answers (any HTTP status); raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered at {url} within {timeout} s")


@contextmanager
def running(args: list[str], url: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `args` with `env` added, wait until `url` answers, and stop the process on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=out)
        try:
            wait_http(url, proc)
            yield proc
        finally:
            stop_process(proc, timeout=15)


@contextmanager
def moto_s3(log: Path) -> Iterator[str]:
    """The endpoint URL of a moto S3 server on a loopback port (the bench's object store)."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        raise RuntimeError("moto_server is not installed: pip install -e '.[dev]'")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(S3_ENV)
    with running([str(server), "-H", "127.0.0.1", "-p", str(port)], endpoint, S3_ENV, log):
        yield endpoint


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    """The process's direct children (e.g. uvicorn's worker processes), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class RedisServer:
    """A private redis-server on a loopback port, without persistence, that can be restarted.

    `restart()` is `SHUTDOWN NOSAVE` and a fresh start on the same port: every key (queued task
    messages included) is gone, as after a crash of a Redis that keeps no AOF or RDB file.
    """

    def __init__(self, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.log}")
            time.sleep(0.05)
        return self

    def _ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SHUTDOWN NOSAVE: the server exits and forgets everything."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
