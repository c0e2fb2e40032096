"""`python -m services.launcher` stops its three children when it is sent SIGTERM, not only on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.launcher import REPO_ROOT, free_port


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found |= {int(child) for child in text}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the launcher exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


@pytest.mark.e2e
def test_sigterm_stops_every_child(tmp_path: Path) -> None:
    control, inference = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")} | {
        "MUST_DATABASE__URL": f"sqlite:///{tmp_path / 'must.db'}",
        "MUST_STORAGE__ARTIFACTS_URI": (tmp_path / "store").as_uri(),
        "MUST_BROKER__FILESYSTEM_FOLDER": str(tmp_path / "broker"),
        "MUST_METRICS__WORKER_PORT": "0",
        "TMPDIR": str(tmp_path),
    }
    args = [
        sys.executable, "-m", "services.launcher", "--control-port", str(control),
        "--inference-port", str(inference), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_ready(f"http://127.0.0.1:{inference}/readyz", proc)
        # The worker is started last; wait until it is there too.
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        children = _children(proc.pid)
        assert len(children) == 3

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while any(_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [child for child in children if _alive(child)]
    finally:
        if proc.poll() is None:
            proc.kill()
