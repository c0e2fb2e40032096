"""The inference app: `create_app` wires settings, the job database, the artifacts store and the predictor.

The classifier cache and predictor are built once in the lifespan. uvicorn calls the factory:

    uvicorn api.inference.main:create_app --factory --host 0.0.0.0 --port 8001
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from fastapi import FastAPI
from sqlalchemy import Engine

from api.common import health, metrics
from api.common.auth import API_KEY, install_auth
from api.common.errors import SECURED_ERRORS, error_responses
from api.common.limits import BodySizeLimit
from api.common.logs import use_json_logs
from api.inference import routes
from api.inference.deps import ImageReader
from api.inference.device import Precision
from api.inference.errors import register_inference_errors
from api.inference.memory import release_cuda_library_pages
from api.inference.predictor import ClassifierCache, Predictor
from api.inference.threads import ThreadChooser
from services.config import Settings, get_settings
from services.db.session import make_engine, make_session_factory
from services.storage.base import ObjectStore

TITLE = "MUST inference"
DESCRIPTION = """\
Classify images with an adapted classifier (`adaptation_id`) or, for comparison, the zero-shot
baseline of a CLIP for the same class list (`model` + `class_names`).
"""


@dataclass(frozen=True)
class ServingOptions:
    """How the predictor runs; the defaults suit one GPU or a small CPU box."""

    device: str | None = None
    cache_dir: Path | None = None
    max_models: int = 4
    # None: by device (`default_max_batch`).
    max_batch: int | None = None
    max_wait_s: float = 0.005
    preprocess_workers: int = 2
    # The forward's precision: "auto" is bf16 (fp16 without bf16) on a GPU and fp32 on a CPU.
    precision: Precision = "auto"
    # How stale an adaptation's artifact version may be: the job row is read at most this often.
    artifact_recheck_s: float = 2.0


def default_max_batch(device: str | torch.device) -> int:
    """The batch size cap: 32 images on a GPU, 8 on a CPU.

    On a CPU a ViT-B-32 forward costs about as much per image at 8 as at 32, and with 32
    requests in flight small batches take turns: some batches' requests are answered, sent
    again and decoded while another runs. On the 2-core development machine (bench.inference,
    32 in flight) a cap of 8 served 0.96 of the bare model's batched throughput, 16 only 0.74.
    """
    return 32 if torch.device(device).type == "cuda" else 8


def _build_predictor(app: FastAPI, options: ServingOptions) -> Predictor:
    settings: Settings = app.state.settings
    store, prefix = app.state.artifacts
    cache_dir = options.cache_dir or Path(tempfile.gettempdir()) / "must-inference-cache"
    reader: ImageReader = app.state.image_reader
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = ClassifierCache(
        session_factory=app.state.session_factory,
        store=store,
        prefix=prefix,
        cache_dir=cache_dir,
        device=device,
        max_models=options.max_models,
        recheck_s=options.artifact_recheck_s,
        model_file=partial(reader.model_file, folder=cache_dir / "models"),
    )
    return Predictor(
        cache,
        max_image_bytes=settings.limits.max_object_bytes,
        max_image_pixels=settings.limits.max_image_pixels,
        max_request_pixels=settings.limits.max_request_pixels,
        max_batch=options.max_batch or default_max_batch(device),
        max_wait_s=options.max_wait_s,
        preprocess_workers=options.preprocess_workers,
        # On a CPU the forward shares the cores with decoding and the event loop: its thread
        # count is chosen by timing (api/inference/threads.py). A GPU forward has no such choice.
        threads=ThreadChooser() if torch.device(device).type == "cpu" else None,
        precision=options.precision,
    )


def _lifespan(options: ServingOptions) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Build the predictor once; stop its threads and close the database pool at shutdown."""
        app.state.predictor = _build_predictor(app, options)
        # On a host without a GPU, the pages torch's CUDA libraries left resident (about 190 MB).
        release_cuda_library_pages()
        yield
        await app.state.predictor.close()
        engine: Engine = app.state.engine
        engine.dispose()

    return lifespan


def create_app(
    settings: Settings | None = None,
    *,
    options: ServingOptions | None = None,
    artifacts_store: ObjectStore | None = None,
) -> FastAPI:
    """Build the inference app; `settings` default to the environment, the store to `artifacts_uri`."""
    settings = settings or get_settings()
    use_json_logs(settings)
    app = FastAPI(title=TITLE, description=DESCRIPTION, lifespan=_lifespan(options or ServingOptions()))
    engine = make_engine(settings.database.url)
    reader = ImageReader(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.image_reader = reader
    app.state.artifacts = (
        (artifacts_store, "") if artifacts_store is not None else reader.open(settings.storage.artifacts_uri)
    )
    app.state.readiness_checks = {
        "database": partial(health.check_database, engine),
        "artifacts_store": lambda: app.state.artifacts[0].check_access(),
    }
    register_inference_errors(app)
    install_auth(app, app.state.session_factory)
    # Inside the metrics middleware, so the 413s it answers are counted too.
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.limits.max_upload_bytes, setting="MUST_LIMITS__MAX_UPLOAD_BYTES"
    )
    metrics.install_metrics(app)
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.include_router(routes.router, dependencies=[API_KEY], responses=error_responses(*SECURED_ERRORS))
    app.router.routes.insert(0, routes.FAST_PREDICT)
    return app
