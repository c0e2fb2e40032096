"""`must upload` skips what is already stored; progress is plain periodic lines off a terminal."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from client.progress import CountProgress, JobProgressBar
from client.upload import local_etag, plan_upload, upload
from services.jobs.states import JobStatus
from services.schemas.jobs import _PUBLIC_EXAMPLE, AdaptationPublic


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    for i in range(3):
        (folder / "a" / f"img-{i}.png").write_bytes(bytes([i]) * 1000)
    (folder / "big.jpg").write_bytes(os.urandom(9 * 1024 * 1024))  # sent in parts by boto3
    return folder


def test_a_second_upload_sends_only_what_changed(tmp_path: Path, s3_client: Any, bucket: str) -> None:
    folder = _folder(tmp_path)
    plan = plan_upload(folder, f"s3://{bucket}/set/")

    first = upload(plan, s3_client, workers=2)
    again = upload(plan, s3_client, workers=2)
    (folder / "a" / "img-1.png").write_bytes(b"\x09" * 1000)  # same size, other bytes
    changed = upload(plan, s3_client, workers=2)

    assert (first, again, changed) == ((4, 0), (0, 4), (1, 3))
    stored = s3_client.get_object(Bucket=bucket, Key="set/a/img-1.png")["Body"].read()
    assert stored == b"\x09" * 1000
    head = s3_client.head_object(Bucket=bucket, Key="set/big.jpg")
    assert head["ETag"].strip('"') == local_etag(folder / "big.jpg")
    assert local_etag(folder / "big.jpg").endswith("-2")


def _job(step: int, **progress: Any) -> AdaptationPublic:
    data = _PUBLIC_EXAMPLE | {"progress": _PUBLIC_EXAMPLE["progress"] | {"step": step, **progress}}
    return AdaptationPublic.model_validate(data)


def test_off_a_terminal_the_job_bar_prints_plain_lines_with_one_rate_and_one_eta() -> None:
    stream = io.StringIO()
    with JobProgressBar(stream=stream, interval=3600) as bar:
        bar.update(_job(500))
        bar.update(_job(600))  # within the interval, same phase: no line
        bar.update(
            _job(2000, eta_seconds=None).model_copy(update={"status": JobStatus.SUCCEEDED, "phase": None})
        )

    lines = stream.getvalue().splitlines()
    assert lines[0] == "training: 500/2000 steps (25%), 210.5 img/s, ETA 0:23:45, confident 61%"
    assert lines[1].startswith("succeeded: 2000/2000 steps (100%), 210.5 img/s")
    assert len(lines) == 2
    assert all(line.count("/s") == 1 and line.count("ETA") <= 1 for line in lines)
    assert "\r" not in stream.getvalue()


def test_off_a_terminal_counts_print_a_line_per_interval_and_at_the_end() -> None:
    stream = io.StringIO()
    progress = CountProgress(4, "file", stream=stream, interval=3600)
    for _ in range(4):
        progress.update()
    progress.close()

    (line,) = stream.getvalue().splitlines()
    assert line.startswith("upload: 4/4 files (100%), ")
    assert line.count("files/s") == 1
    assert line.endswith("ETA 0:00:00")
