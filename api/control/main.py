"""The control-plane app: `create_app` wires settings, the job database, the queue and the stores.

There is no module-level `app`: building one opens a database engine (creating the SQLite folder
in embedded mode) and a Celery app, which importers of this module (tests, tools, the import
boundary check) should not pay for. uvicorn calls the factory at start:

    uvicorn api.control.main:create_app --factory --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from sqlalchemy import Engine

from api.common import health, metrics
from api.common.auth import API_KEY, install_auth
from api.common.errors import SECURED_ERRORS, error_responses, register_exception_handlers
from api.common.limits import BodySizeLimit
from api.common.logs import use_json_logs
from api.control.dashboard import mount_dashboard
from api.control.deps import StoreOpener
from api.control.queue import CeleryJobQueue, JobQueue
from api.control.routes import adaptations, artifacts, predictions, samples
from services.config import Settings, get_settings
from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory
from worker.celery_app import broker_transport_options, make_celery

TITLE = "MUST control plane"
DESCRIPTION = """\
Adapt a CLIP zero-shot classifier to your own unlabeled images with Masked Unsupervised
Self-Training (MUST), without labelling anything.

1. `POST /adaptations` with your class names and an `s3://` prefix of images: the job is queued (202).
2. Watch it with `GET /adaptations/{id}` (progress, ETA, label-free metrics) and
   `GET /adaptations/{id}/metrics` (history for plots).
3. When it has `succeeded`, its `artifact.uri` is the adapted classifier the inference service serves.

The same, in a browser: the dashboard at `/dashboard/` (it asks for your API key).
"""
OPENAPI_TAGS = [
    {"name": "adaptations", "description": "Submit, list, inspect and cancel adaptation jobs."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


def _version() -> str:
    try:
        return version("must-platform")
    except PackageNotFoundError:
        return "0.0.0+source"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Embedded mode has no migrate step or bucket setup of its own, so do both at start."""
    settings: Settings = app.state.settings
    if settings.environment == "embedded":
        upgrade(settings.database.url)
        app.state.store_opener(settings.storage.artifacts_uri, create=True)
    yield
    engine: Engine = app.state.engine
    engine.dispose()


def _readiness_checks(
    settings: Settings, engine: Engine, opener: StoreOpener
) -> dict[str, health.ReadinessCheck]:
    """What `/readyz` checks: the job database, the broker and the artifacts store."""

    def artifacts_store() -> None:
        opener(settings.storage.artifacts_uri)[0].check_access()

    broker = partial(
        health.check_broker,
        settings.broker.url,
        transport_options=broker_transport_options(settings),
        timeout=health.READINESS_DEADLINE_SECONDS,
    )
    return {
        "database": partial(health.check_database, engine),
        "broker": broker,
        "artifacts_store": artifacts_store,
    }


def create_app(settings: Settings | None = None, *, queue: JobQueue | None = None) -> FastAPI:
    """Build the control-plane app; `settings` default to the environment, `queue` to Celery."""
    settings = settings or get_settings()
    use_json_logs(settings)
    app = FastAPI(
        title=TITLE,
        version=_version(),
        description=DESCRIPTION,
        openapi_tags=OPENAPI_TAGS,
        lifespan=_lifespan,
    )
    engine = make_engine(settings.database.url)
    opener = StoreOpener(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.queue = queue if queue is not None else CeleryJobQueue(make_celery(settings))
    app.state.store_opener = opener
    app.state.readiness_checks = _readiness_checks(settings, engine, opener)
    register_exception_handlers(app)
    install_auth(app, app.state.session_factory)
    # Inside the metrics middleware, so the 413s it answers are counted too.
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.limits.max_body_bytes, setting="MUST_LIMITS__MAX_BODY_BYTES"
    )
    metrics.install_metrics(app, session_factory=app.state.session_factory)
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.include_router(adaptations.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.include_router(artifacts.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.include_router(samples.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.include_router(predictions.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    mount_dashboard(app)
    return app
