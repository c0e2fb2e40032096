"""Instant jobs, and MUST jobs warm-started from the instant head, through the real pipeline on
SQLite, a real S3-compatible server (moto) and the pretrained shapes CLIP."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import CLASS_NAMES, iter_domain
from services.config import DatabaseSettings, Settings, StorageSettings
from services.db.models import Job
from services.jobs import repository
from services.jobs.states import JobStatus
from services.must.export import load_classifier
from services.schemas.jobs import AdaptationPublic
from tests.worker.conftest import NUM_IMAGES, create_job, tiny_request
from worker.pipeline import run_training_job

DATASET = "instant-target/"


@pytest.fixture
def settings(sqlite_url: str, moto_s3: str, bucket: str) -> Settings:
    return Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint_url=moto_s3),
    )


@pytest.fixture
def dataset_uri(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    for i, data in enumerate(target_pngs):
        s3_client.put_object(Bucket=bucket, Key=f"{DATASET}img-{i:03d}.png", Body=data)
    return f"s3://{bucket}/{DATASET}"


def _instant_request(dataset_uri: str, **overrides: Any) -> dict[str, Any]:
    return tiny_request(dataset_uri, method="instant", hparams={"guard_images": 32}) | overrides


def _run(job_id: str, session_factory: sessionmaker[Session], settings: Settings, tmp_path: Path) -> Job:
    run_training_job(
        job_id,
        session_factory=session_factory,
        settings=settings,
        device="cpu",
        worker_id="worker-a",
        work_dir=tmp_path / "work",
    )
    with session_factory() as session:
        return repository.get_job(session, job_id)


def _manifest(s3_client: Any, bucket: str, job_id: str) -> dict[str, Any]:
    key = f"artifacts/adaptations/{job_id}/classifier/manifest.json"
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _feature_keys(s3_client: Any, bucket: str) -> list[str]:
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="artifacts/features/")
    return [obj["Key"] for obj in listed.get("Contents", ())]


def test_instant_job_publishes_a_classifier_and_caches_the_features(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    job_id = create_job(session_factory, _instant_request(dataset_uri))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.served in {"instant", "zero_shot"}
    assert job.outcome is not None
    assert job.outcome["method"] == "instant"
    assert [c["name"] for c in job.outcome["candidates"]] == ["zero_shot", "instant"]
    public = AdaptationPublic.from_job(job)
    assert public.outcome is not None
    assert public.outcome.method == "instant"
    assert job.step == job.total_steps
    assert job.total_steps is not None
    assert job.total_steps > 1
    manifest = _manifest(s3_client, bucket, job_id)
    assert manifest["metrics"]["method"] == "instant"
    assert manifest["metrics"]["instant"]["features_cached"] is False
    assert manifest["network"] == job.served
    # Served like any other artifact: the classifier loads from the store and classifies.
    folder = tmp_path / "artifact"
    folder.mkdir()
    for name in ("model.safetensors", "manifest.json"):
        key = f"artifacts/adaptations/{job_id}/classifier/{name}"
        s3_client.download_file(bucket, key, str(folder / name))
    classifier = load_classifier(folder)
    assert classifier.predict(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # One features object, keyed by the tower's and the images' digests.
    (key,) = _feature_keys(s3_client, bucket)
    assert key.startswith("artifacts/features/")
    assert key.endswith(".safetensors")
    assert len(key.split("/")) == 4

    again = _run(
        create_job(session_factory, _instant_request(dataset_uri)), session_factory, settings, tmp_path
    )

    assert again.status == JobStatus.SUCCEEDED, again.error_message
    assert _manifest(s3_client, bucket, again.id)["metrics"]["instant"]["features_cached"] is True
    assert _feature_keys(s3_client, bucket) == [key]
    assert again.served == job.served
    with session_factory() as session:
        assert repository.list_metrics(session, again.id)[-1].step == again.total_steps


def test_cancel_requested_stops_an_instant_job(
    session_factory: sessionmaker[Session], settings: Settings, dataset_uri: str, tmp_path: Path
) -> None:
    job_id = create_job(session_factory, _instant_request(dataset_uri))
    with session_factory() as session:
        repository.get_job(session, job_id).cancel_requested = True
        session.commit()

    assert _run(job_id, session_factory, settings, tmp_path).status == JobStatus.CANCELLED


def test_must_job_warm_started_from_the_instant_head(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    request = tiny_request(dataset_uri, warm_start="instant")
    request["hparams"] |= {"guard_images": 32}
    job_id = create_job(session_factory, request)

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.outcome is not None
    assert job.outcome["method"] == "must"
    warm = job.outcome["warm_start"]
    assert warm["method"] == "instant"
    assert isinstance(warm["used"], bool)
    assert warm["used"] == (warm["guard"]["served"] == "instant")
    assert {c["name"] for c in job.outcome["candidates"]} >= {"zero_shot", "teacher", "student"}
    assert _manifest(s3_client, bucket, job_id)["metrics"]["warm_start"] == warm
    assert job.images_used == NUM_IMAGES
    assert len(_feature_keys(s3_client, bucket)) == 1


def test_instant_job_with_a_training_hparam_is_refused_when_run(
    session_factory: sessionmaker[Session], settings: Settings, dataset_uri: str, tmp_path: Path
) -> None:
    # Stored by another route than the API (which refuses it with a 422): the worker checks again.
    job_id = create_job(session_factory, _instant_request(dataset_uri, hparams={"total_steps": 5}))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.FAILED
    assert "do not apply to method 'instant'" in (job.error_message or "")


def _labelled_folder(s3_client: Any, bucket: str, per_class: dict[str, int], prefix: str = "few/") -> str:
    """A folder-per-class labelled set on S3: `per_class[name]` target images of each named class."""
    wanted = dict(per_class)
    drawn = iter_domain("target", 400, seed=21)
    for i, (image, label) in enumerate(drawn):
        name = CLASS_NAMES[label]
        if wanted.get(name, 0) > 0:
            wanted[name] -= 1
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}{name}/{i}.png", Body=buffer.getvalue())
        if not any(wanted.values()):
            break
    return f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize("method", ["instant", "must"])
def test_few_label_job_trains_on_the_labelled_set(
    method: str,
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    uri = _labelled_folder(s3_client, bucket, dict.fromkeys(CLASS_NAMES, 2))
    request = tiny_request(dataset_uri, labelled={"uri": uri})
    if method == "instant":
        request = _instant_request(dataset_uri, labelled={"uri": uri})

    job = _run(create_job(session_factory, request), session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    manifest = _manifest(s3_client, bucket, job.id)
    assert manifest["metrics"]["labelled"] == {"images": 20, "per_class": [2] * len(CLASS_NAMES)}
    if method == "must":
        with session_factory() as session:
            assert repository.list_metrics(session, job.id)[-1].values["supervised"] > 0


@pytest.mark.parametrize(
    ("per_class", "message"),
    [
        (
            dict.fromkeys(CLASS_NAMES[:-1], 1),
            f"labelled set: no image for 1 class(es): {CLASS_NAMES[-1]}",
        ),
        (dict.fromkeys(CLASS_NAMES, 1) | {CLASS_NAMES[0]: 17}, f"more for {CLASS_NAMES[0]} (17)"),
    ],
)
def test_a_labelled_set_that_misses_a_class_or_has_too_many_fails_clearly(
    per_class: dict[str, int],
    message: str,
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    uri = _labelled_folder(
        s3_client, bucket, per_class, prefix=f"few-{len(per_class)}-{sum(per_class.values())}/"
    )
    job = _run(
        create_job(session_factory, _instant_request(dataset_uri, labelled={"uri": uri})),
        session_factory,
        settings,
        tmp_path,
    )

    assert job.status == JobStatus.FAILED
    assert message in (job.error_message or "")


def test_a_label_that_is_not_a_class_name_fails_clearly(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    uri = _labelled_folder(s3_client, bucket, dict.fromkeys(CLASS_NAMES, 1), prefix="few-odd/")
    s3_client.copy_object(
        Bucket=bucket,
        Key="few-odd/hexagon/x.png",
        CopySource={
            "Bucket": bucket,
            "Key": next(
                o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="few-odd/")["Contents"]
            ),
        },
    )
    job = _run(
        create_job(session_factory, _instant_request(dataset_uri, labelled={"uri": uri})),
        session_factory,
        settings,
        tmp_path,
    )

    assert job.status == JobStatus.FAILED
    assert "labelled set:" in (job.error_message or "")
    assert "hexagon" in (job.error_message or "")
