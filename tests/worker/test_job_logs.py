"""Collecting one job's log lines: which records are kept, and the limit per attempt."""

from __future__ import annotations

import logging

import pytest

from worker.logs import JobLogBuffer, collect_job_logs, set_current_job


def test_own_lines_from_info_and_library_lines_from_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with collect_job_logs("job-1") as buffer:
        logging.getLogger("worker.pipeline").info("job %s: %s", "job-1", "training")
        logging.getLogger("services.must.adapt").debug("too fine")
        logging.getLogger("botocore.credentials").info("found credentials")
        logging.getLogger("botocore.retries").warning("retrying")
        logging.getLogger("worker.pipeline").info("other job", extra={"job_id": "job-2"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("worker.pipeline").exception("failed")
    logging.getLogger("worker.pipeline").info("after the job")

    lines = buffer.drain()
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("INFO", "worker.pipeline"),
        ("WARNING", "botocore.retries"),
        ("ERROR", "worker.pipeline"),
    ]
    assert lines[0]["message"] == "job job-1: training"
    assert lines[2]["message"].startswith("failed\nTraceback")
    assert "ValueError: boom" in lines[2]["message"]
    assert lines[0]["created_at"].tzinfo is not None
    assert buffer.drain() == []


def test_lines_of_another_current_job_are_left_out() -> None:
    buffer = JobLogBuffer("job-1")
    set_current_job("job-2")
    try:
        buffer.handle(logging.LogRecord("worker.pipeline", logging.INFO, __file__, 1, "x", None, None))
    finally:
        set_current_job(None)
    assert buffer.drain() == []


def test_lines_past_the_limit_are_counted_and_noted_at_the_end() -> None:
    buffer = JobLogBuffer("job-1", max_lines=2)
    for i in range(5):
        buffer.handle(logging.LogRecord("worker.pipeline", logging.INFO, __file__, 1, "line %d", (i,), None))

    assert [line["message"] for line in buffer.drain()] == ["line 0", "line 1"]
    final = buffer.drain(final=True)
    assert [line["message"] for line in final] == [
        "3 more log lines of this attempt were not stored (limit 2)"
    ]
