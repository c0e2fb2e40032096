"""An inference app per test on a migrated SQLite database and a bucket on the moto S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.inference.main import ServingOptions, create_app
from bench.shapes import CLASS_NAMES, iter_domain
from bench.tiny_clip import TINY_CLIP_SPEC
from services.config import Settings
from services.db.migrate import upgrade
from services.db.models import Job
from services.jobs import repository
from services.must.adapt import prepare
from services.must.export import MANIFEST, WEIGHTS, Manifest, export_classifier
from services.storage.base import ObjectStore
from services.storage.keys import classifier_manifest_key, classifier_weights_key
from services.storage.s3 import S3ObjectStore

# 32x32 test images pass; anything over 64x64 pixels is refused as too large.
MAX_IMAGE_PIXELS = 64 * 64


@dataclass(frozen=True)
class Export:
    """An exported classifier folder and its manifest."""

    folder: Path
    manifest: Manifest


def _export(out_dir: Path, head_scale: float) -> Export:
    prepared = prepare(TINY_CLIP_SPEC, CLASS_NAMES)
    classifier = prepared.classifier()
    # Scaling the head changes the weights (and their sha256), as a newer training run would.
    cast(torch.Tensor, classifier.head).mul_(head_scale)
    manifest = export_classifier(
        classifier,
        out_dir,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
    )
    return Export(out_dir, manifest)


@pytest.fixture(scope="package")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Export, Export]:
    """Two versions of an adapted classifier (built once for all inference tests)."""
    root = tmp_path_factory.mktemp("exports")
    return _export(root / "v1", 1.0), _export(root / "v2", 0.5)


@pytest.fixture(scope="package")
def images() -> list[Image.Image]:
    """Synthetic 32x32 RGB images."""
    return [image for image, _ in iter_domain("target", 16, seed=3)]


@pytest.fixture
def settings(sqlite_url: str, moto_s3: str, bucket: str) -> Settings:
    """Settings on a migrated SQLite file and the test bucket."""
    upgrade(sqlite_url)
    values: dict[str, Any] = {
        "database": {"url": sqlite_url},
        "storage": {"artifacts_uri": f"s3://{bucket}", "s3_endpoint_url": moto_s3},
        "limits": {"max_image_pixels": MAX_IMAGE_PIXELS},
    }
    return Settings(**values)


@pytest.fixture
def store(s3_client: Any, bucket: str) -> S3ObjectStore:
    """The artifacts store (the test bucket)."""
    return S3ObjectStore(s3_client, bucket)


@pytest.fixture
def options(tmp_path: Path) -> ServingOptions:
    """CPU serving with a per-test cache folder."""
    return ServingOptions(device="cpu", cache_dir=tmp_path / "cache", preprocess_workers=2)


@pytest.fixture
def app(settings: Settings, options: ServingOptions) -> FastAPI:
    """The inference app under test."""
    return create_app(settings, options=options)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client of the started app (lifespan run: predictor built)."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session_factory(app: FastAPI) -> sessionmaker[Session]:
    """Sessions on the app's database, to arrange jobs."""
    factory: sessionmaker[Session] = app.state.session_factory
    return factory


def queued_job(session_factory: sessionmaker[Session]) -> str:
    """A new queued adaptation job's id."""
    with session_factory() as session:
        job = repository.create_job(session, request={"class_names": list(CLASS_NAMES)}, idempotency_key=None)
        return job.id


def publish(store: ObjectStore, job_id: str, export: Export) -> None:
    """Upload an export under the job's classifier keys, weights first."""
    store.upload_file(classifier_weights_key(job_id), export.folder / WEIGHTS)
    store.upload_file(classifier_manifest_key(job_id), export.folder / MANIFEST)


def succeeded_job(session_factory: sessionmaker[Session], store: ObjectStore, export: Export) -> str:
    """A succeeded adaptation whose classifier is `export`."""
    job_id = queued_job(session_factory)
    publish(store, job_id, export)
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="test", lease_seconds=60)
        repository.mark_succeeded(
            session, job_id, artifact_uri="s3://x/classifier", artifact_sha256=export.manifest.weights_sha256
        )
    return job_id


def republish(
    session_factory: sessionmaker[Session], store: ObjectStore, job_id: str, export: Export
) -> None:
    """Publish a newer classifier for a finished job, as a re-export would."""
    publish(store, job_id, export)
    with session_factory() as session:
        stmt = update(Job).where(Job.id == job_id).values(artifact_sha256=export.manifest.weights_sha256)
        session.execute(stmt)
        session.commit()


def by_label(predictions: list[dict[str, Any]]) -> dict[str, float]:
    """{label: probability} of one answer's predictions."""
    return {p["label"]: p["probability"] for p in predictions}


def as_dict(probs: torch.Tensor) -> dict[str, float]:
    """{label: probability} of one row of class probabilities."""
    return {name: float(p) for name, p in zip(CLASS_NAMES, probs.tolist(), strict=True)}
