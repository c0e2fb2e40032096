"""Liveness (`/healthz`) and readiness (`/readyz`) probes.

Readiness runs the checks an app puts in `app.state.readiness_checks` (name -> callable that
raises when its component is unusable) in parallel, each bounded by a short deadline, so a
hanging dependency makes the probe answer 503 instead of hanging the probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy import Engine, text

from api.common.errors import ServiceUnavailable
from services.errors import DomainError

ReadinessCheck = Callable[[], None]

# Kubernetes' default probe timeout is 1 s; a little over 2 s lets a slow-but-alive dependency pass
# while still answering well inside typical load balancer health-check timeouts.
READINESS_DEADLINE_SECONDS = 2.5
MAX_DETAIL_CHARS = 300

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class ComponentStatus(BaseModel):
    """Whether one dependency answered."""

    status: Literal["ok", "error"]
    detail: str | None = None


class Readiness(BaseModel):
    """The readiness of the process and of each dependency."""

    status: Literal["ok", "unavailable"]
    components: dict[str, ComponentStatus]


class Liveness(BaseModel):
    """The process answers."""

    status: Literal["ok"] = "ok"


def check_database(engine: Engine) -> None:
    """Run `SELECT 1` on a pooled connection."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def check_broker(url: str, *, transport_options: Mapping[str, Any], timeout: float) -> None:
    """Ping Redis, look for the filesystem broker's folders, or let kombu connect to anything else.

    The clients are imported here: only the control API checks the broker, and the inference
    service, which shares this module, should not load them.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in {"redis", "rediss"}:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    elif scheme == "filesystem":
        folder = Path(transport_options.get("data_folder_in", "data_in"))
        if not folder.is_dir():
            raise ServiceUnavailable(f"the filesystem broker's folder {str(folder)!r} does not exist")
    else:
        from kombu.connection import Connection

        with Connection(url, connect_timeout=timeout, transport_options=dict(transport_options)) as conn:
            conn.ensure_connection(max_retries=1)


def _describe(exc: BaseException) -> str:
    """A failed check's own message, or only the type of an unexpected error: the probe is open to
    anyone, and a driver's message names hosts, ports and users (it goes to the log instead)."""
    if isinstance(exc, DomainError):
        return exc.message[:MAX_DETAIL_CHARS]
    logger.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
    return f"{type(exc).__name__} (details in the service's log)"


def _outcome(future: Future[None], deadline: float) -> ComponentStatus:
    try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return ComponentStatus(status="error", detail="no answer before the readiness deadline")
    except Exception as exc:
        return ComponentStatus(status="error", detail=_describe(exc))
    return ComponentStatus(status="ok")


def run_checks(
    checks: Mapping[str, ReadinessCheck], *, deadline_seconds: float
) -> dict[str, ComponentStatus]:
    """Run every check in its own thread and report each one's outcome by the shared deadline."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(checks)), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(check) for name, check in checks.items()}
        deadline = time.monotonic() + deadline_seconds
        return {name: _outcome(future, deadline) for name, future in futures.items()}
    finally:
        # A check stuck past the deadline is left to finish on its own; the probe must not wait.
        pool.shutdown(wait=False, cancel_futures=True)


@router.get("/healthz", response_model=Liveness)
def healthz() -> Liveness:
    """Liveness: the process is up and serving requests; checks no dependency."""
    return Liveness()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": Readiness, "description": "Not ready"}},
)
def readyz(request: Request, response: Response) -> Readiness:
    """Readiness: the database, the broker and the artifacts store answer (503 naming any that do not)."""
    checks: Mapping[str, ReadinessCheck] = request.app.state.readiness_checks
    components = run_checks(checks, deadline_seconds=READINESS_DEADLINE_SECONDS)
    ready = all(component.status == "ok" for component in components.values())
    response.status_code = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
    return Readiness(status="ok" if ready else "unavailable", components=components)
