"""Prometheus metrics of the HTTP services, served at `/metrics` in the text exposition format.

Each app gets its own `CollectorRegistry` (built by `install_metrics`), so several apps in one
process (tests, an embedded launcher) never register the same metric twice. Requests are
counted by the route's path template (`/adaptations/{adaptation_id}`), not the raw path, so a
client that walks many ids cannot blow up the number of series.
https://prometheus.io/docs/practices/naming/ and https://prometheus.io/docs/practices/instrumentation/
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.db.models import Job
from services.jobs.states import JobStatus

logger = logging.getLogger(__name__)

# The route label of requests that matched no route (404s for arbitrary paths).
UNMATCHED = "<unmatched>"
PredictionSource = Literal["adaptation", "zero_shot"]

router = APIRouter(tags=["metrics"])


@dataclass(frozen=True)
class ServiceMetrics:
    """One app's registry and the metrics its middleware and routes update."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    predictions: Counter

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and record its latency."""
        labels = {"method": method, "route": route, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(seconds)


def _make_metrics() -> ServiceMetrics:
    registry = CollectorRegistry()
    labels = ["method", "route", "status"]
    return ServiceMetrics(
        registry=registry,
        requests=Counter(
            "must_http_requests", "HTTP requests answered, by route and status", labels, registry=registry
        ),
        latency=Histogram(
            "must_http_request_duration_seconds",
            "Time from request to the end of the response, by route and status",
            labels,
            registry=registry,
        ),
        predictions=Counter(
            "must_predictions",
            "Images classified, by classifier source (adapted or zero-shot baseline)",
            ["source"],
            registry=registry,
        ),
    )


class JobsByStatus(Collector):
    """`must_jobs{status}`: how many adaptation jobs are in each status, read at scrape time."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge per status (zero included); `must_jobs_query_up` says whether the query worked."""
        up = GaugeMetricFamily("must_jobs_query_up", "1 if the job database answered the last scrape")
        try:
            with self.session_factory() as session:
                rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        except SQLAlchemyError as exc:
            # A scrape must still answer (with the request metrics) while the database is away.
            logger.warning("could not count jobs for /metrics: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        counts = {status.value: 0 for status in JobStatus} | {str(s): n for s, n in rows}
        jobs = GaugeMetricFamily("must_jobs", "Adaptation jobs by status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        up.add_metric([], 1)
        yield jobs
        yield up


def _route_of(scope: Scope) -> str:
    """The path template of the route that handled the request, once routing has run."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request (no buffering of bodies, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # An exception that escapes the app becomes a 500 further out, so count it as one.
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.observe_request(scope["method"], _route_of(scope), status, elapsed)


def install_metrics(app: FastAPI, *, session_factory: sessionmaker[Session] | None = None) -> ServiceMetrics:
    """Give `app` a registry and the timing middleware; with `session_factory`, also `must_jobs`."""
    metrics = _make_metrics()
    if session_factory is not None:
        metrics.registry.register(JobsByStatus(session_factory))
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics


def record_predictions(request: Request, source: PredictionSource, count: int) -> None:
    """Count `count` images classified by the app serving `request` (no-op if it has no metrics)."""
    metrics: ServiceMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.predictions.labels(source=source).inc(count)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route and status, and what this service counts."""
    metrics: ServiceMetrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
