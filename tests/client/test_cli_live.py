"""The `must` command and the Python client against the running platform (tests/stack.py).

The real services: the control API and the inference service under uvicorn, a Celery worker
process, PostgreSQL, Redis and the moto S3 server, with API keys required.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.shapes import CLASS_NAMES, iter_domain, png_bytes
from client.cli import EXIT_JOB_FAILED, EXIT_OK, EXIT_REFUSED
from client.http import MustClient, NotFound, Unauthorized
from tests.stack import Stack

pytestmark = pytest.mark.e2e

MUST = Path(sys.executable).parent / "must"
STEPS = 4


def run_must(stack: Stack, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `must` console script against the stack, configured through the environment."""
    env = os.environ | {
        "MUST_API_URL": stack.platform.control_url,
        "MUST_INFERENCE_URL": stack.platform.inference_url,
        "MUST_API_KEY": stack.api_key if api_key is None else api_key,
    }
    return subprocess.run([str(MUST), *args], capture_output=True, text=True, env=env, timeout=300)


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample, sorted labels): value} of a Prometheus text answer."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local folder of 16 target-domain PNGs in two subfolders, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    for i, (image, _) in enumerate(iter_domain("target", 16, seed=5)):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"img-{i:02d}.png").write_bytes(png_bytes(image))
    (folder / "README.txt").write_text("not an image")
    return folder


def test_upload_adapt_watch_status_list_predict(stack: Stack, images: Path, moto_s3: str) -> None:
    prefix = stack.uri("cli/photos/")
    model = stack.tiny_clip()
    templates = images.parent / "templates.txt"
    templates.write_text("a photo of a {}.\n")

    uploaded = run_must(stack, "upload", str(images), prefix, "--endpoint-url", moto_s3)
    adapted = run_must(
        stack, "adapt", prefix, "--classes", ",".join(CLASS_NAMES),
        "--model-config", model["config"], "--checkpoint", model["checkpoint"],
        "--templates", str(templates), "--steps", str(STEPS), "--batch-size", "8", "--wait", "--poll", "0.5",
    )  # fmt: skip

    assert uploaded.returncode == EXIT_OK, uploaded.stderr
    assert "uploaded 16 images" in uploaded.stdout
    assert "1 non-image files left out" in uploaded.stdout
    assert stack.keys("cli/photos/") == {f"{'a' if i % 2 else 'b'}/img-{i:02d}.png" for i in range(16)}
    assert adapted.returncode == EXIT_OK, adapted.stdout + adapted.stderr
    assert "submitted adaptation" in adapted.stderr
    assert f"{STEPS}/{STEPS}" in adapted.stderr  # the progress bar reached the last step
    assert "status    succeeded" in adapted.stdout
    job_id = adapted.stdout.split()[1]

    status = run_must(stack, "status", job_id)
    newest = run_must(stack, "status")
    listed = run_must(stack, "list", "--status", "succeeded")
    predicted = run_must(
        stack, "predict", job_id, str(images / "a" / "img-01.png"), f"{prefix}b/img-00.png", "--top-k", "2"
    )
    results = images.parent / "results.jsonl"
    batch = run_must(stack, "predict", job_id, prefix, "--out", str(results), "--top-k", "2", "--poll", "0.3")
    zero_shot = run_must(
        stack, "predict", "--zero-shot", "--classes", ",".join(CLASS_NAMES),
        "--model-config", model["config"], "--checkpoint", model["checkpoint"],
        str(images / "a" / "img-01.png"), "--json",
    )  # fmt: skip
    cancelled = run_must(stack, "cancel", job_id)

    assert status.returncode == newest.returncode == listed.returncode == EXIT_OK
    assert f"id        {job_id}" in status.stdout
    assert "artifact  s3://" in status.stdout
    assert f"{STEPS}/{STEPS} steps (100%)" in status.stdout
    assert job_id in newest.stdout
    assert listed.stdout.splitlines()[0].split() == ["ID", "STATUS", "PHASE", "PROGRESS", "CREATED"]
    assert any(line.startswith(job_id) and "succeeded" in line for line in listed.stdout.splitlines())
    assert predicted.returncode == EXIT_OK, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        str(images / "a" / "img-01.png"),
        f"{prefix}b/img-00.png",
    ]
    assert all(line.count(",") == 1 for line in lines)  # two labels each
    # The batch run over the whole prefix: one line per image, the same labels as /predict gives.
    assert batch.returncode == EXIT_OK, batch.stdout + batch.stderr
    assert "16 images (0 unusable" in batch.stdout
    records = {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {f"cli/photos/{'a' if i % 2 else 'b'}/img-{i:02d}.png" for i in range(16)}
    one = records["cli/photos/a/img-01.png"]
    assert len(one["predictions"]) == 2
    shown = [pair.rsplit(" ", 1) for pair in lines[0].split(": ", 1)[1].split(", ")]
    assert [label for label, _ in shown] == [p["label"] for p in one["predictions"]]
    assert [float(p) for _, p in shown] == pytest.approx(
        [p["probability"] for p in one["predictions"]], abs=2e-3
    )
    assert zero_shot.returncode == EXIT_OK, zero_shot.stderr
    assert json.loads(zero_shot.stdout)["predictions"][0]["label"] in CLASS_NAMES
    assert cancelled.returncode == EXIT_REFUSED
    assert "409" in cancelled.stderr

    control = stack.control().get("/metrics").raise_for_status().text
    inference = stack.inference().get("/metrics").raise_for_status().text
    assert scrape(control)[("must_jobs", (("status", "succeeded"),))] >= 1
    submitted = (("method", "POST"), ("route", "/adaptations"), ("status", "202"))
    assert scrape(control)[("must_http_requests_total", submitted)] >= 1
    assert scrape(inference)[("must_predictions_total", (("source", "adaptation"),))] >= 2


def test_a_failing_job_exits_1_and_says_why(stack: Stack) -> None:
    prefix = stack.uri("cli/no-images/")
    stack.put("cli/no-images/notes.txt", b"nothing to see")
    model = stack.tiny_clip()

    result = run_must(
        stack, "adapt", prefix, "--classes", "cat,dog", "--model-config", model["config"],
        "--checkpoint", model["checkpoint"], "--wait", "--poll", "0.5",
    )  # fmt: skip

    assert result.returncode == EXIT_JOB_FAILED, result.stdout + result.stderr
    assert "status    failed" in result.stdout
    assert "error     " in result.stdout


def test_refused_requests_exit_3_with_the_services_reason(stack: Stack) -> None:
    empty = run_must(stack, "adapt", stack.uri("cli/nothing-here/"), "--classes", "cat,dog")
    missing = run_must(stack, "status", "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")

    assert empty.returncode == missing.returncode == EXIT_REFUSED
    assert "holds no objects" in empty.stderr
    assert "404" in missing.stderr


def test_a_missing_or_wrong_api_key_is_refused_with_a_hint(stack: Stack) -> None:
    no_key = run_must(stack, "list", api_key="")
    wrong = run_must(stack, "list", api_key="not-the-key")

    assert no_key.returncode == wrong.returncode == EXIT_REFUSED
    assert "401" in no_key.stderr
    assert "requires an API key" in no_key.stderr
    assert "not valid" in wrong.stderr
    assert "MUST_API_KEY" in wrong.stderr


def test_cancel_stops_a_long_job_and_status_wait_reports_it(stack: Stack) -> None:
    dataset = stack.put_images("cli/long/", (image for image, _ in iter_domain("target", 16, seed=7)))
    with MustClient(stack.platform.control_url, api_key=stack.api_key) as must:
        model = stack.tiny_clip()
        job = must.adapt(
            dataset,
            list(CLASS_NAMES),
            model=model,
            templates=["a photo of a {}."],
            hparams={"total_steps": 5000},
        )
        stack.wait(job.id, until=lambda j: j["phase"] == "training" or j["status"] != "queued", timeout=120)

        cancel = run_must(stack, "cancel", job.id)
        watched = run_must(stack, "status", job.id, "--wait", "--poll", "0.5")

        assert cancel.returncode == EXIT_OK, cancel.stderr
        assert job.id in cancel.stdout
        assert watched.returncode == EXIT_JOB_FAILED
        assert "status    cancelled" in watched.stdout
        assert must.wait(job.id, poll_seconds=0.5, timeout=30).status == "cancelled"
        with pytest.raises(NotFound):
            must.get("0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")
    with MustClient(stack.platform.control_url, api_key="wrong") as must, pytest.raises(Unauthorized):
        must.list_adaptations()
