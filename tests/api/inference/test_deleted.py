"""A deleted adaptation stops being served within the recheck interval, and leaves the cache."""

from __future__ import annotations

import time
from dataclasses import replace

from fastapi.testclient import TestClient
from PIL import Image

from api.inference.main import ServingOptions, create_app
from bench.shapes import png_bytes
from services.config import Settings
from services.jobs import repository
from services.storage.s3 import S3ObjectStore
from tests.api.inference.conftest import Export, succeeded_job


def test_a_deleted_adaptation_answers_404_after_the_recheck_interval_and_is_dropped(
    settings: Settings,
    options: ServingOptions,
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    recheck_s = 1.0
    app = create_app(settings, options=replace(options, artifact_recheck_s=recheck_s))
    files = [("files", ("a.png", png_bytes(images[0])))]
    with TestClient(app) as client:
        job_id = succeeded_job(app.state.session_factory, store, exports[0])
        assert client.post("/predict", data={"adaptation_id": job_id}, files=files).status_code == 200
        assert (options.cache_dir / job_id).is_dir()

        with app.state.session_factory() as session:
            repository.stop_for_delete(session, job_id)
            assert repository.delete_job(session, job_id)
        time.sleep(recheck_s + 0.1)
        gone = client.post("/predict", data={"adaptation_id": job_id}, files=files)

        assert gone.status_code == 404
        assert "does not exist" in gone.json()["detail"]
        assert not (options.cache_dir / job_id).exists()
        assert app.state.predictor.cache.peek(job_id) is None
