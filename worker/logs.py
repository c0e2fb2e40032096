"""Worker log lines as JSON objects, each carrying the id of the job the process is running, and
the collection of one job's lines for the job database.

A Celery prefork child runs one task at a time, so the current job is a process-wide value
rather than a ContextVar: the threads a job starts (lease heartbeat, data loading) log under
the same id, which a ContextVar, empty in every new thread, would not give them.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any, Literal

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


# Enough for every phase, guard and checkpoint line of a long job; a job that logs more keeps its first lines.
MAX_JOB_LOG_LINES = 10_000
MAX_LOG_MESSAGE_CHARS = 4_000
# The platform's own loggers are kept from INFO up; libraries' (boto, urllib3, celery) from WARNING up.
OWN_LOGGERS = ("worker", "services", "api")


class JobLogBuffer(logging.Handler):
    """Collects the log lines of one job so the pipeline can store them (`GET /adaptations/{id}/logs`).

    `emit` only appends to a list: it runs in any thread, inside any library, and must never block
    on the database. The pipeline calls `drain` at each phase change and when the job stops.
    """

    def __init__(self, job_id: str, max_lines: int = MAX_JOB_LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.job_id = job_id
        self.max_lines = max_lines
        self._lines: list[dict[str, Any]] = []
        self._taken = 0
        self.dropped = 0
        self._guard = threading.Lock()

    def _wanted(self, record: logging.LogRecord) -> bool:
        job = getattr(record, "job_id", None) or _current_job
        if job not in (None, self.job_id):
            return False
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return own or record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        if not self._wanted(record):
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a bad format string must not break the job
            message = str(record.msg)
        line = {
            "created_at": datetime.fromtimestamp(record.created, UTC),
            "level": record.levelname[:16],
            "logger": record.name[:255],
            "message": message[:MAX_LOG_MESSAGE_CHARS],
        }
        with self._guard:
            if self._taken >= self.max_lines:
                self.dropped += 1
                return
            self._taken += 1
            self._lines.append(line)

    def drain(self, final: bool = False) -> list[dict[str, Any]]:
        """The lines collected since the last drain, oldest first; the `final` drain adds a line
        saying how many were left out past `max_lines`."""
        with self._guard:
            lines, self._lines = self._lines, []
            if final and self.dropped:
                note = (
                    f"{self.dropped} more log lines of this attempt were not stored (limit {self.max_lines})"
                )
                lines.append(
                    {"created_at": datetime.now(UTC), "level": "WARNING", "logger": __name__, "message": note}
                )
                self.dropped = 0
        return lines


@contextmanager
def collect_job_logs(job_id: str) -> Iterator[JobLogBuffer]:
    """Collect the job's lines from every logger while the block runs."""
    buffer = JobLogBuffer(job_id)
    root = logging.getLogger()
    root.addHandler(buffer)
    try:
        yield buffer
    finally:
        root.removeHandler(buffer)
