"""With JSON logs on, uvicorn's own log lines are JSON objects too."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.common.logs import UVICORN_LOGGERS, use_json_logs
from tests.api.conftest import make_settings


@pytest.fixture
def uvicorn_stream() -> Iterator[io.StringIO]:
    """uvicorn's loggers with plain-text handlers on one stream, as uvicorn sets them up; restored after."""
    stream = io.StringIO()
    saved = {name: logging.getLogger(name).handlers[:] for name in UVICORN_LOGGERS}
    for name in ("uvicorn.error", "uvicorn.access"):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logging.getLogger(name).handlers = [handler]
    yield stream
    for name, handlers in saved.items():
        logging.getLogger(name).handlers = handlers


def test_uvicorn_lines_become_json_only_when_json_logs_are_on(
    uvicorn_stream: io.StringIO, tmp_path: Path, sqlite_url: str
) -> None:
    use_json_logs(make_settings(sqlite_url, tmp_path, log_format="text"))
    logging.getLogger("uvicorn.error").error("plain")
    use_json_logs(make_settings(sqlite_url, tmp_path, log_format="json"))
    logging.getLogger("uvicorn.error").error("Started server process [%d]", 42)
    logging.getLogger("uvicorn.access").error(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/healthz", "1.1", 200
    )

    first, *rest = uvicorn_stream.getvalue().splitlines()
    assert first == "ERROR: plain"
    records = [json.loads(line) for line in rest]
    assert [r["message"] for r in records] == [
        "Started server process [42]",
        '127.0.0.1:5 - "GET /healthz HTTP/1.1" 200',
    ]
    assert [r["logger"] for r in records] == ["uvicorn.error", "uvicorn.access"]
    assert all(r["level"] == "ERROR" and "time" in r for r in records)
