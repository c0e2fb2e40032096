"""Worker log lines as JSON objects, each carrying the id of the job the process is running.

A Celery prefork child runs one task at a time, so the current job is a process-wide value
rather than a ContextVar: the threads a job starts (lease heartbeat, data loading) log under
the same id, which a ContextVar, empty in every new thread, would not give them.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]

# The keys of every JSON line, after renaming: time, level, logger, message, job_id, process, thread.
_JSON_FIELDS = "{levelname}{name}{message}{job_id}{process}{threadName}"
_RENAMED = {"levelname": "level", "name": "logger", "threadName": "thread"}
_TEXT_FORMAT = "%(asctime)s %(levelname)s [job %(job_id)s] %(name)s: %(message)s"

_current_job: str | None = None


def set_current_job(job_id: str | None) -> None:
    """Tag the process's log lines with `job_id` from now on (None: no job)."""
    global _current_job
    _current_job = job_id


def current_job() -> str | None:
    """The id of the job this process is running, if any."""
    return _current_job


class JobIdFilter(logging.Filter):
    """Adds `job_id` to every record (one passed in `extra` wins over the process's current job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _current_job
        return True


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    """One JSON object per line with an ISO-8601 UTC `time`, or plain text for a terminal."""
    if fmt == "text":
        return logging.Formatter(_TEXT_FORMAT)
    return JsonFormatter(_JSON_FIELDS, style="{", rename_fields=_RENAMED, timestamp="time")


def configure_logging(level: int | str, fmt: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's records through one handler on the root logger; return that handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    root.handlers.clear()
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (deprecations, Celery's running-as-root notice) become log lines too.
    logging.captureWarnings(True)
    return handler
