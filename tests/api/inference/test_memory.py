"""Memory of the inference service under image bombs, measured on a real uvicorn process.

16 PNGs of 7000x7000 (a few hundred KB on the wire, 2.3 GB once decoded) used to raise the
service's resident memory by gigabytes and never return. Now the request is refused from the
image headers, before any decode, and large images that are accepted are decoded one at a time,
reduced on the way, and their memory is handed back.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.loopback import running
from bench.shapes import png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.db.migrate import upgrade
from services.launcher import INFERENCE_APP, free_port, uvicorn_command

FIELDS = {"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH), "class_names": "circle,square"}
SIDE = 7000


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak since the last reset) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values


def _reset_peak(pid: int) -> None:
    """Start VmHWM again from the current resident size (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """One 7000x7000 image as PNG and as JPEG (49 million pixels each, under the per-image limit)."""
    image = Image.new("RGB", (SIDE, SIDE), (40, 90, 160))
    out = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out[fmt] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The inference service in its own process (embedded mode: local model files are allowed)."""
    root = tmp_path_factory.mktemp("inference-memory")
    db_url = f"sqlite:///{root / 'must.db'}"
    upgrade(db_url)
    port = free_port()
    env = {
        "MUST_ENVIRONMENT": "embedded",
        "MUST_DATABASE__URL": db_url,
        "MUST_STORAGE__ARTIFACTS_URI": (root / "store").as_uri(),
        "TMPDIR": str(root),
    }
    url = f"http://127.0.0.1:{port}"
    command = uvicorn_command(INFERENCE_APP, "127.0.0.1", port)
    with running(command, f"{url}/healthz", env, root / "inference.log") as proc:
        with httpx.Client(base_url=url, timeout=120) as http:
            small = png_bytes(Image.new("RGB", (32, 32)))
            warm = http.post("/predict", data=FIELDS, files={"files": ("w.png", small)})
            assert warm.status_code == 200, warm.text
        yield url, proc.pid


def test_the_image_bomb_batch_is_refused_from_headers_with_413(
    service: tuple[str, int], bombs: dict[str, bytes]
) -> None:
    url, pid = service
    files = [("files", (f"bomb-{i}.png", bombs["PNG"], "image/png")) for i in range(16)]
    _reset_peak(pid)
    before = _memory_mb(pid)["VmRSS"]
    start = time.monotonic()

    with httpx.Client(base_url=url, timeout=120) as http:
        answer = http.post("/predict", data=FIELDS, files=files)

    took = time.monotonic() - start
    peak = _memory_mb(pid)["VmHWM"]
    assert answer.status_code == 413, answer.text
    assert "MUST_LIMITS__MAX_REQUEST_PIXELS" in answer.json()["detail"]
    assert took < 10
    # Nothing was decoded: the request's own bytes (2 MB) and parsing are all it cost.
    assert peak - before < 100, (before, peak)


def test_too_many_files_are_refused_with_413(service: tuple[str, int]) -> None:
    url, _ = service
    tiny = png_bytes(Image.new("RGB", (8, 8)))
    files = [("files", (f"{i}.png", tiny, "image/png")) for i in range(65)]

    with httpx.Client(base_url=url, timeout=120) as http:
        answer = http.post("/predict", data=FIELDS, files=files)

    assert answer.status_code == 413, answer.text
    assert "MUST_LIMITS__MAX_FILES_PER_REQUEST" in answer.json()["detail"]


def test_large_images_within_the_budget_are_served_and_memory_goes_back(
    service: tuple[str, int], bombs: dict[str, bytes]
) -> None:
    url, pid = service
    files = [
        ("files", ("big.png", bombs["PNG"], "image/png")),
        ("files", ("big.jpg", bombs["JPEG"], "image/jpeg")),
    ]
    _reset_peak(pid)
    before = _memory_mb(pid)["VmRSS"]

    with httpx.Client(base_url=url, timeout=120) as http:
        answer = http.post("/predict", data=FIELDS, files=files)

    after = _memory_mb(pid)
    assert answer.status_code == 200, answer.text
    assert [r["filename"] for r in answer.json()["results"]] == ["big.png", "big.jpg"]
    # One full-size decode at a time (the PNG: 147 MB; the JPEG is decoded at 1/8 scale).
    assert after["VmHWM"] - before < 450, (before, after)
    assert after["VmRSS"] - before < 60, (before, after)
