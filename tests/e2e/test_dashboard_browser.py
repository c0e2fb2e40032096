"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright.

One test runs a real job on the tiny CLIP through the whole platform (API keys on) and watches
it in the page; the others serve the control API in this process, embedded, on a job arranged in
its database as a long run on 200 classes leaves it (20,000 metric rows), to check the page
stays bounded, and render fields (evaluation, phases) that only some API versions report.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from api.control.main import create_app
from bench.shapes import CLASS_NAMES, iter_domain
from services.launcher import free_port
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
from tests.stack import Stack

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MUST_TEST_CHROMIUM", "/usr/bin/chromium"))
# Screenshots land here (CI keeps the folder as the run's artifacts).
ARTIFACTS = Path(os.environ.get("MUST_TEST_ARTIFACTS", "runs/test-artifacts"))
TIMEOUT_MS = 30_000
CLASSES_200 = [f"class {i:03d}" for i in range(200)]
# A short schedule on few images: the page only has to watch a real job, not a useful one.
REAL_JOB_IMAGES = 160
REAL_JOB_HPARAMS = '{"total_steps": 40, "batch_size": 16, "lr": 0.0001, "checkpoint_every": 20}'


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium from the distribution (Playwright's own download needs the internet)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set MUST_TEST_CHROMIUM)")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Console:
    """The page's console errors and uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (its own sessionStorage) at a desktop size."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a loopback port in a thread of this process (lifespan included)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the control API stopped while starting"
        assert time.monotonic() < deadline, "the control API did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def embedded(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, sessionmaker[Session]]]:
    """The control API, embedded (no key), on a SQLite file, served over HTTP; its URL and sessions."""
    app = create_app(make_settings(sqlite_url, tmp_path), queue=RecordingJobQueue())
    with serving(app) as url:
        yield url, app.state.session_factory


def chart_data(page: Any, canvas_id: str) -> dict[str, Any]:
    """The labels and datasets of the Chart.js chart drawn on `canvas_id`, as the page holds them."""
    data: dict[str, Any] = page.evaluate(
        """(id) => {
            const chart = Chart.getChart(document.getElementById(id));
            return {labels: chart.data.labels || [],
                    datasets: chart.data.datasets.map((d) => ({label: d.label, data: d.data}))};
        }""",
        canvas_id,
    )
    return data


def wait_for_chart(page: Any, canvas_id: str, min_points: int = 1) -> None:
    page.wait_for_function(
        """([id, n]) => {
            const canvas = document.getElementById(id);
            const chart = canvas && Chart.getChart(canvas);
            return chart && chart.data.datasets.length && chart.data.datasets[0].data.length >= n;
        }""",
        arg=[canvas_id, min_points],
    )


def wait_for_thumbnails(page: Any, count: int) -> None:
    """Until `count` sample thumbnails have loaded (decoded, from the API's JPEGs)."""
    page.locator("#samples .class-block").first.scroll_into_view_if_needed()
    page.wait_for_function(
        """(n) => [...document.querySelectorAll('#samples img')]
                    .filter((img) => img.complete && img.naturalWidth > 0).length >= n""",
        arg=count,
    )


def save_screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.mark.e2e
def test_a_wrong_key_gets_the_login_prompt_and_the_right_one_the_jobs(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.platform.control_url}/dashboard/")
    prompt = page.locator("#login")
    prompt.wait_for(state="visible")
    assert "needs an API key" in page.locator("#login-error").inner_text()

    page.fill("#api-key", "not-the-key")
    page.click("#login-form button[type=submit]")

    prompt.wait_for(state="visible")
    assert "not valid" in page.locator("#login-error").inner_text()
    assert page.evaluate("sessionStorage.getItem('must.apiKey')") == "not-the-key"
    page.fill("#api-key", stack.api_key)
    page.click("#login-form button[type=submit]")
    page.locator("#jobs-view").wait_for(state="visible")
    assert prompt.is_hidden()


def _submit_through_the_form(page: Any, stack: Stack) -> str:
    """Fill and send the page's submit form for a short job on the tiny CLIP; the new job's id."""
    dataset = stack.put_images(
        "dashboard/", (image for image, _ in iter_domain("target", REAL_JOB_IMAGES, seed=31))
    )
    model = stack.tiny_clip()
    form = page.locator("#submit-form")
    form.locator("[name=class_names]").fill("\n".join(CLASS_NAMES))
    form.locator("[name=dataset_uri]").fill(dataset)
    form.locator("[name=arch]").fill("")
    form.locator("[name=pretrained]").fill("")
    form.locator("[name=checkpoint]").fill(model["checkpoint"])
    form.locator("[name=config]").fill(model["config"])
    form.locator("[name=hparams]").fill(REAL_JOB_HPARAMS)
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/dashboard/#/jobs/*")
    return str(page.url.rsplit("/", 1)[1])


@pytest.mark.e2e
def test_a_real_job_watched_live_in_the_dashboard(stack: Stack, page: Any) -> None:
    page.goto(f"{stack.platform.control_url}/dashboard/")
    page.fill("#api-key", stack.api_key)
    page.click("#login-form button[type=submit]")
    page.locator("#jobs-view").wait_for(state="visible")
    console = Console(page)  # from here on, after the key is known, nothing may go wrong

    job_id = _submit_through_the_form(page, stack)

    # Live: the loss curve fills while the job trains.
    wait_for_chart(page, "curve-losses")
    page.locator("#job-status", has_text="succeeded").wait_for(timeout=600_000)
    job = stack.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    with stack.control() as http:
        rows = http.get(f"/adaptations/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    last_step = rows[-1]["step"]
    page.wait_for_function(
        "(step) => { const s = window.mustDashboard.state.series; return s && s.last_step === step; }",
        arg=last_step,
    )

    # The curves hold the job's points (fewer than max_points: all of them).
    losses = {d["label"]: d["data"] for d in chart_data(page, "curve-losses")["datasets"]}
    assert set(losses) == {"loss", "self_training", "fairness", "mim", "align"}
    expected = [{"x": r["step"], "y": r["values"]["loss"]} for r in rows]
    assert losses["loss"] == expected
    for canvas, metric in [
        ("curve-lr", "lr"),
        ("curve-confident", "confident_fraction"),
        ("curve-entropy", "mean_pred_entropy"),
        ("curve-agreement", "agreement"),
    ]:
        plotted = {d["label"]: d["data"] for d in chart_data(page, canvas)["datasets"]}
        assert [p["y"] for p in plotted[metric]] == pytest.approx([r["values"][metric] for r in rows])

    # Zero-shot against the served classifier, on the guard's sample.
    wait_for_chart(page, "distribution-chart")
    distribution = chart_data(page, "distribution-chart")
    counts = job["outcome"]["predictions"]["class_counts"]
    assert distribution["labels"] == list(CLASS_NAMES)
    assert [d["label"] for d in distribution["datasets"]] == ["zero-shot", f"served: {job['served']}"]
    assert distribution["datasets"][0]["data"] == counts["zero_shot"]
    assert distribution["datasets"][1]["data"] == counts.get(job["served"], counts["zero_shot"])

    # The guard's scores per candidate, the served one marked.
    served_row = page.locator(f"#guard-table tr.served[data-candidate='{job['served']}']")
    assert served_row.count() == 1
    assert page.locator("#guard-table tbody tr").count() == len(job["outcome"]["candidates"])

    # Thumbnails of the job's own images, read from the bucket by the API (each class as it scrolls in).
    blocks = page.locator("#samples .class-block")
    for i in range(blocks.count()):
        blocks.nth(i).scroll_into_view_if_needed()
    wait_for_thumbnails(page, page.locator("#samples img").count())
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)  # let the last thumbnails and charts settle before the picture
    shot = save_screenshot(page, "dashboard-job.png")
    assert shot.stat().st_size > 10_000
    assert console.errors == []


def test_200_classes_and_20000_metric_rows_stay_bounded_and_update_live(
    embedded: tuple[str, sessionmaker[Session]], page: Any, tmp_path: Path
) -> None:
    url, session_factory = embedded
    folder = tmp_path / "unlabeled"
    keys = write_images(folder, 600)
    request = {"class_names": CLASSES_200, "dataset": {"uri": folder.as_uri()}}
    job_id = start_job(session_factory, request, total_steps=20_000)
    add_metric_rows(session_factory, job_id, 20_000)
    console = Console(page)

    started = time.monotonic()
    page.goto(f"{url}/dashboard/#/jobs/{job_id}")
    wait_for_chart(page, "curve-losses")
    loaded = time.monotonic() - started

    loss = next(d for d in chart_data(page, "curve-losses")["datasets"] if d["label"] == "loss")
    assert len(loss["data"]) <= 1000
    assert (loss["data"][0]["x"], loss["data"][-1]["x"]) == (1, 20_000)
    assert {"x": SPIKE_STEP, "y": SPIKE} in loss["data"]
    assert page.locator("#cancel").is_visible()
    assert "20000 metric rows" in page.locator("#curves-note").inner_text()

    # The worker finishes the job while the page is open: the page picks the outcome up.
    finish_job(session_factory, job_id, outcome_for(CLASSES_200, keys))
    page.locator("#job-status", has_text="succeeded").wait_for()
    wait_for_chart(page, "distribution-chart")
    distribution = chart_data(page, "distribution-chart")
    assert len(distribution["labels"]) == 200
    assert [d["label"] for d in distribution["datasets"]] == ["zero-shot", "served: teacher"]
    assert distribution["datasets"][0]["data"][0] == 600
    assert page.locator("#job-gain").inner_text() == "+0.0312 guard margin"
    assert page.locator("#cancel").is_hidden()
    assert page.locator("#samples .class-block").count() == 200
    wait_for_thumbnails(page, 3)
    save_screenshot(page, "dashboard-200-classes.png")
    print(f"\ndashboard: 20,000 rows x 15 metrics, 200 classes: curves drawn {loaded:.1f} s after loading")
    assert loaded < 20

    page.goto(f"{url}/dashboard/#/")
    row = page.locator(f"#jobs-table tr[data-job='{job_id}']")
    assert "+0.0312 guard margin" in row.inner_text()
    assert "teacher" in row.inner_text()
    assert console.errors == []


def test_cancel_from_the_job_page(embedded: tuple[str, sessionmaker[Session]], page: Any) -> None:
    url, session_factory = embedded
    job_id = start_job(session_factory, {"class_names": ["a", "b"], "dataset": {"uri": "s3://b/x/"}}, 100)
    page.goto(f"{url}/dashboard/#/jobs/{job_id}")
    page.once("dialog", lambda dialog: dialog.accept())

    page.click("#cancel")

    page.locator("#cancel", has_text="Cancelling").wait_for()
    from services.jobs import repository

    with session_factory() as session:
        assert repository.get_job(session, job_id).cancel_requested


def _evaluation(classes: list[str]) -> dict[str, Any]:
    """An `evaluation` field as the API reports it where it evaluates on a labelled set."""
    k = len(classes)

    def confusion(right: int) -> list[list[int]]:
        return [[right if t == p else (1 if p == (t + 1) % k else 0) for p in range(k)] for t in range(k)]

    def candidate(top1: float, right: int) -> dict[str, Any]:
        recall = dict.fromkeys(classes, right / (right + 1))
        return {"top1": top1, "per_class_recall": recall, "confusion": confusion(right)}

    return {
        "images": k * 10,
        "class_names": classes,
        "served": "teacher",
        "candidates": {
            "zero_shot": candidate(0.5, 1),
            "teacher": candidate(0.9, 9),
            "student": candidate(0.8, 4),
        },
    }


def test_evaluation_and_phases_render_where_the_api_reports_them(
    embedded: tuple[str, sessionmaker[Session]], page: Any
) -> None:
    url, session_factory = embedded
    job_id = start_job(session_factory, {"class_names": CLASSES_200, "dataset": {"uri": "s3://b/x/"}}, 100)
    page.goto(f"{url}/dashboard/#/jobs/{job_id}")
    page.locator("#job-status", has_text="running").wait_for()
    console = Console(page)
    job = page.evaluate("window.mustDashboard.state.job")
    phases = [
        {"phase": "listing", "started_at": "2026-11-30T10:00:00Z", "ended_at": "2026-11-30T10:00:05Z"},
        {"phase": "training", "started_at": "2026-11-30T10:00:05Z", "ended_at": "2026-11-30T10:10:05Z"},
        {"phase": "exporting", "started_at": "2026-11-30T10:10:05Z", "ended_at": None},
    ]
    job |= {"phases": phases, "evaluation": _evaluation(CLASSES_200), "served": "teacher"}

    page.evaluate(
        """(job) => {
            window.mustDashboard.stopPolling();  // the live job has neither field: keep the fixture's
            window.mustDashboard.renderTimeline(job);
            window.mustDashboard.renderEvaluation(job);
        }""",
        job,
    )

    timeline = chart_data(page, "timeline-chart")
    assert timeline["labels"] == ["listing", "training", "exporting"]
    assert timeline["datasets"][0]["data"][:2] == [[0, 5], [5, 605]]
    top1 = chart_data(page, "eval-top1")
    assert top1["labels"] == ["zero_shot", "teacher", "student"]
    assert top1["datasets"][0]["data"] == pytest.approx([50, 90, 80])
    assert page.locator("#eval-candidate").input_value() == "teacher"
    matrix = chart_data(page, "eval-confusion")
    assert len(matrix["datasets"][0]["data"]) == 2 * 200  # the non-zero cells
    assert {"x": "class 000", "y": "class 000", "v": 9, "share": 0.9} in matrix["datasets"][0]["data"]
    assert len(chart_data(page, "eval-recall")["labels"]) == 200
    page.select_option("#eval-candidate", "zero_shot")
    assert {"x": "class 000", "y": "class 000", "v": 1, "share": 0.5} in chart_data(page, "eval-confusion")[
        "datasets"
    ][0]["data"]
    assert page.evaluate("(job) => window.mustDashboard.gainText(job)", job) == "+40 pts top-1"
    save_screenshot(page, "dashboard-evaluation.png")
    assert console.errors == []
