"""JSON log lines for the HTTP services, uvicorn's own included, when `log_format` is json.

uvicorn configures its loggers (`uvicorn.error`, `uvicorn.access`) with plain-text handlers before
it calls the app factory, so `create_app` swaps those handlers' formatter for a JSON one, and gives
the root logger a JSON handler when nothing else (a test's log capture) has set one up.
https://www.uvicorn.org/settings/#logging
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from services.config import Settings

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# The keys of every line, as the worker's (worker/logs.py) less the job id: time, level, logger, message.
_FIELDS = "{levelname}{name}{message}{process}{threadName}"
_RENAMED = {"levelname": "level", "name": "logger", "threadName": "thread"}


def json_formatter() -> logging.Formatter:
    """One JSON object per line with an ISO-8601 UTC `time`."""
    return JsonFormatter(_FIELDS, style="{", rename_fields=_RENAMED, timestamp="time")


def use_json_logs(settings: Settings) -> None:
    """With `log_format` json: uvicorn's handlers and, if it has none, the root logger write JSON."""
    if settings.log_format != "json":
        return
    for name in UVICORN_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(json_formatter())
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(json_formatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
