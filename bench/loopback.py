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
