"""A job survives a killed worker, and a cancelled job stops quickly and keeps its checkpoint."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from bench.shapes import CLASS_NAMES, iter_domain
from tests.stack import Stack

pytestmark = pytest.mark.e2e

HPARAMS: dict[str, Any] = {"batch_size": 16, "checkpoint_every": 5, "seed": 0}


def _submit(stack: Stack, prefix: str, total_steps: int) -> str:
    dataset = stack.put_images(prefix, (image for image, _ in iter_domain("target", 64, seed=31)))
    body = {
        "class_names": list(CLASS_NAMES),
        "dataset": {"uri": dataset},
        "model": stack.tiny_clip(),
        "templates": ["a photo of a {}."],
        "hparams": HPARAMS | {"total_steps": total_steps},
    }
    with stack.control() as http:
        answer = http.post("/adaptations", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _checkpointed(min_step: int) -> Any:
    """A wait condition: training has passed `min_step` and a checkpoint is published."""

    def check(job: dict[str, Any]) -> bool:
        assert job["status"] in {"queued", "running"}, job
        return bool(job["checkpoint_uri"]) and job["progress"]["step"] >= min_step

    return check


def _stored_step(stack: Stack, job_id: str) -> int:
    body = stack.s3.get_object(
        Bucket=stack.bucket, Key=f"artifacts/adaptations/{job_id}/checkpoints/latest.json"
    )
    return int(json.loads(body["Body"].read())["step"])


def test_sigkilled_worker_job_resumes_from_its_checkpoint_on_a_new_worker(
    stack: Stack, tmp_path: Path
) -> None:
    job_id = _submit(stack, "crash/", total_steps=30)
    stack.wait(job_id, _checkpointed(min_step=7), timeout=300)
    (worker,) = [w for w in stack.platform.workers() if w.proc.poll() is None]
    worker.proc.kill()
    worker.proc.wait(timeout=10)
    killed_at = time.monotonic()

    # A fresh work folder, as on another machine: the checkpoint must come from the object store.
    replacement = stack.platform.start_worker({"TMPDIR": str(tmp_path)})
    job = stack.wait(job_id, timeout=300)

    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == 30
    log = replacement.log_path.read_text(errors="replace")
    job_lines = [line for line in log.splitlines() if job_id in line]
    restored = [re.search(r"restored the checkpoint of step (\d+)", line) for line in job_lines]
    resumed = [re.search(r"resumed from step (\d+)", line) for line in job_lines]
    steps = [int(match.group(1)) for match in resumed if match]
    assert steps, log[-3000:]
    assert steps[0] >= 5
    assert [int(match.group(1)) for match in restored if match] == steps[:1]
    took = time.monotonic() - killed_at
    print(f"\nthe killed worker's job resumed at step {steps[0]} and finished {took:.0f} s later")


def test_cancelled_running_job_stops_within_seconds_and_keeps_its_checkpoint(stack: Stack) -> None:
    job_id = _submit(stack, "cancel/", total_steps=2000)
    running = stack.wait(job_id, _checkpointed(min_step=6), timeout=300)

    asked = time.monotonic()
    with stack.control() as http:
        answer = http.post(f"/adaptations/{job_id}/cancel")
    assert answer.status_code == 202, answer.text
    job = stack.wait(job_id, timeout=60)
    stopped_after = time.monotonic() - asked

    assert job["status"] == "cancelled"
    assert stopped_after < 20, f"the job took {stopped_after:.1f} s to stop"
    assert job["checkpoint_uri"]
    assert _stored_step(stack, job_id) >= running["progress"]["step"]
    assert job["progress"]["step"] < 2000
