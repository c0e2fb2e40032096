"""One round trip through a real uvicorn server on a loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from PIL import Image

from api.inference.main import ServingOptions, create_app
from bench.shapes import png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import Settings
from services.launcher import free_port


@pytest.fixture
def server_url(settings: Settings, options: ServingOptions) -> Iterator[str]:
    """The base URL of the inference app served by uvicorn in a background thread."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, options=options), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_uvicorn_serves_health_and_predictions(server_url: str, images: list[Image.Image]) -> None:
    fields = {"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH), "class_names": "cat,dog,bird"}
    files = [("files", ("a.png", png_bytes(images[0]), "image/png"))]
    with httpx.Client(base_url=server_url, timeout=30) as http:
        health = http.get("/healthz")
        ready = http.get("/readyz")
        answer = http.post("/predict", data=fields, files=files)
        bad = http.post("/predict", data=fields, files=[("files", ("x.txt", b"text", "text/plain"))])

    assert health.status_code == 200
    assert ready.status_code == 200, ready.text
    assert answer.status_code == 200, answer.text
    assert {p["label"] for p in answer.json()["results"][0]["predictions"]} == {"cat", "dog", "bird"}
    assert bad.status_code == 422
