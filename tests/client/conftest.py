"""A real control API under uvicorn (in a thread, on loopback) for the client and `must` command tests.

Embedded settings on a SQLite file and a local artifacts folder; jobs are queued to a recording
queue, and tests move them through their states with the repository, as a worker would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from api.control.main import create_app
from services.config import Settings
from services.launcher import free_port
from services.storage.base import ObjectStore
from services.storage.object_store import open_store
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue


@dataclass
class ControlServer:
    """The running control API: its URL, settings, database sessions and artifacts store."""

    url: str
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    prefix: str
    dataset: Path


@pytest.fixture
def control_server(sqlite_url: str, tmp_path: Path) -> Iterator[ControlServer]:
    """The control API listening on a free loopback port until the test ends."""
    settings = make_settings(sqlite_url, tmp_path)
    app = create_app(settings, queue=RecordingJobQueue())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the control API did not start")
        time.sleep(0.05)
    dataset = tmp_path / "images"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(b"\x89PNG not decoded at submit")
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    try:
        yield ControlServer(url, settings, app.state.session_factory, store, prefix, dataset)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
