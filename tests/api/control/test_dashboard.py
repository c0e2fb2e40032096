"""The dashboard's routes: its static pages, downsampled metric series and per-class sample thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.control.dashboard import STATIC_DIR
from api.control.main import create_app
from services.db.migrate import upgrade
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue
from tests.dashboard_data import (
    SPIKE,
    SPIKE_STEP,
    add_metric_rows,
    finish_job,
    outcome_for,
    start_job,
    write_images,
)

CLASSES = [f"class {i}" for i in range(200)]
KEY = "dashboard-key-0123456789"


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, list[str]]:
    """A local dataset folder of 600 small PNGs and their keys."""
    folder = tmp_path / "unlabeled"
    return folder, write_images(folder, 600)


@pytest.fixture
def finished(session_factory: sessionmaker[Session], images: tuple[Path, list[str]]) -> str:
    """A succeeded 200-class job on the local dataset, with its outcome and samples recorded."""
    folder, keys = images
    request = {"class_names": CLASSES, "dataset": {"uri": folder.as_uri()}}
    job_id = start_job(session_factory, request, total_steps=100)
    finish_job(session_factory, job_id, outcome_for(CLASSES, keys))
    return job_id


def test_the_dashboard_is_served_with_its_vendored_chart_library_and_a_strict_csp(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard/"
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert "vendor/chart.umd.min.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'self'" in csp
    for name in (
        "dashboard.js",
        "dashboard.css",
        "vendor/chart.umd.min.js",
        "vendor/chartjs-chart-matrix.min.js",
    ):
        answer = client.get(f"/dashboard/{name}")
        assert answer.status_code == 200, name
        assert answer.content == (STATIC_DIR / name).read_bytes()
    assert "Chart.js v4.6.1" in client.get("/dashboard/vendor/chart.umd.min.js").text
    assert client.get("/dashboard/../main.py").status_code == 404
    # The pages are not API routes: the OpenAPI document does not list them.
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not any(path.startswith("/dashboard") for path in paths)


def test_the_pages_load_without_a_key_but_their_data_needs_one(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    (tmp_path / "artifacts").mkdir()
    settings = make_settings(sqlite_url, tmp_path, environment="development", api_keys=[KEY])
    job_id = "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"
    with TestClient(create_app(settings, queue=RecordingJobQueue())) as protected:
        assert protected.get("/dashboard/").status_code == 200
        for path in ("metrics/series", "samples", "samples/0/0"):
            assert protected.get(f"/adaptations/{job_id}/{path}").status_code == 401, path
            wrong = protected.get(f"/adaptations/{job_id}/{path}", headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 401, path
            right = protected.get(f"/adaptations/{job_id}/{path}", headers={"Authorization": f"Bearer {KEY}"})
            assert right.status_code == 404, path


def test_the_metric_series_of_20000_rows_is_downsampled_keeping_first_last_and_extremes(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = start_job(session_factory, body, total_steps=20_000)
    add_metric_rows(session_factory, job_id, 20_000)

    answer = client.get(f"/adaptations/{job_id}/metrics/series", params={"max_points": 500})

    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert (data["rows"], data["max_points"], data["last_step"]) == (20_000, 500, 20_000)
    series = data["series"]
    assert "step" not in series
    assert "total_steps" not in series
    assert {"loss", "self_training", "lr", "confident_fraction", "mean_pred_entropy", "agreement"} <= set(
        series
    )
    for name, points in series.items():
        assert 4 <= len(points["steps"]) <= 500, name
        assert len(points["steps"]) == len(points["values"])
        assert points["steps"] == sorted(points["steps"])
        assert (points["steps"][0], points["steps"][-1]) == (1, 20_000)
    loss = series["loss"]
    assert SPIKE in loss["values"]
    assert loss["steps"][loss["values"].index(SPIKE)] == SPIKE_STEP
    assert min(loss["values"]) > 0


def test_a_short_history_comes_back_whole_and_bounds_are_checked(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = start_job(session_factory, body, total_steps=30)
    empty = client.get(f"/adaptations/{job_id}/metrics/series").json()
    assert (empty["rows"], empty["last_step"], empty["series"]) == (0, None, {})
    add_metric_rows(session_factory, job_id, 30)

    data = client.get(f"/adaptations/{job_id}/metrics/series").json()

    assert data["series"]["loss"]["steps"] == list(range(1, 31))
    assert client.get(f"/adaptations/{job_id}/metrics/series", params={"max_points": 3}).status_code == 422
    assert (
        client.get(f"/adaptations/{job_id}/metrics/series", params={"max_points": 10_001}).status_code == 422
    )
    assert client.get("/adaptations/not-a-job/metrics/series").status_code == 404


def test_samples_list_the_recorded_images_per_class(client: TestClient, finished: str) -> None:
    answer = client.get(f"/adaptations/{finished}/samples")

    assert answer.status_code == 200, answer.text
    samples = answer.json()
    assert (samples["classifier"], samples["per_class"], samples["images"]) == ("teacher", 3, 600)
    assert len(samples["classes"]) == 200
    first = samples["classes"][0]
    assert first == {
        "index": 0,
        "name": "class 0",
        "images": 3,
        "zero_shot": [0, 0, 0],
        "confidence": [0.75, 0.75, 0.75],
    }
    # The keys stay on the server: the page names images by class and position only.
    assert "img-" not in answer.text
    assert "samples" not in client.get(f"/adaptations/{finished}").json()["outcome"]


def test_a_thumbnail_is_a_small_jpeg_of_the_recorded_image(
    client: TestClient, finished: str, images: tuple[Path, list[str]]
) -> None:
    folder, _ = images
    # Class 5's first sample is image 5 (outcome_for deals the images round-robin).
    answer = client.get(f"/adaptations/{finished}/samples/5/0")

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(answer.content))
    assert thumb.format == "JPEG"
    assert max(thumb.size) <= 160
    original = Image.open(folder / "img-00005.png").convert("RGB")
    assert thumb.convert("RGB").getpixel((10, 10)) == pytest.approx(original.getpixel((10, 10)), abs=8)


@pytest.mark.parametrize(("class_index", "position"), [(0, 3), (199, 5), (200, 0)])
def test_positions_without_a_recorded_image_are_404(
    client: TestClient, finished: str, class_index: int, position: int
) -> None:
    assert client.get(f"/adaptations/{finished}/samples/{class_index}/{position}").status_code == 404


def test_paths_in_the_url_cannot_name_an_image(client: TestClient, finished: str) -> None:
    for path in ("samples/0/..%2F..%2Fetc%2Fpasswd", "samples/-1/0", "samples/0/x", "samples/%2E%2E/0"):
        assert client.get(f"/adaptations/{finished}/{path}").status_code in {404, 422}, path


def test_a_recorded_key_outside_the_dataset_folder_is_not_read(
    client: TestClient, session_factory: sessionmaker[Session], images: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, keys = images
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    outcome = outcome_for(CLASSES[:2], keys[:4])
    outcome["samples"]["keys"][0] = ["../secret.png"]
    request = {"class_names": CLASSES[:2], "dataset": {"uri": folder.as_uri()}}
    job_id = start_job(session_factory, request, total_steps=10)
    finish_job(session_factory, job_id, outcome)

    answer = client.get(f"/adaptations/{job_id}/samples/0/0")

    assert answer.status_code in {404, 422}
    assert answer.headers["content-type"].startswith("application/json")


def test_a_job_without_samples_answers_404_with_the_reason(client: TestClient, body: dict[str, Any]) -> None:
    job = client.post("/adaptations", json=body).json()

    for path in ("samples", "samples/0/0"):
        answer = client.get(f"/adaptations/{job['id']}/{path}")
        assert answer.status_code == 404
        assert "recorded when a job succeeds" in answer.json()["detail"]


def test_an_unreadable_sample_image_is_404(
    client: TestClient, finished: str, images: tuple[Path, list[str]]
) -> None:
    folder, _ = images
    (folder / "img-00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "img-00002.png").unlink()

    assert client.get(f"/adaptations/{finished}/samples/1/0").status_code == 404
    assert client.get(f"/adaptations/{finished}/samples/2/0").status_code == 404
    assert client.get(f"/adaptations/{finished}/samples/3/0").status_code == 200
