"""Staging a dataset from the S3 server: concurrent fetches, listing order, skip counts, max_images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.config import Settings, StorageSettings
from services.must.errors import DatasetError
from worker import dataset
from worker.dataset import local_name, stage_images


@pytest.fixture
def settings(moto_s3: str, bucket: str) -> Settings:
    """Settings whose S3 client talks to the moto server."""
    return Settings(storage=StorageSettings(artifacts_uri=f"s3://{bucket}", s3_endpoint_url=moto_s3))


def _upload(s3_client: Any, bucket: str, pngs: list[bytes], count: int) -> list[str]:
    """`count` images with a corrupt one every seventh key and a text file; the usable keys in order."""
    usable = []
    for i in range(count):
        key = f"data/{i:04d}.png"
        if i % 7 == 3:
            s3_client.put_object(Bucket=bucket, Key=key, Body=b"not a png")
        else:
            s3_client.put_object(Bucket=bucket, Key=key, Body=pngs[i % len(pngs)])
            usable.append(key)
    s3_client.put_object(Bucket=bucket, Key="data/notes.txt", Body=b"text")
    return usable


def test_concurrent_staging_keeps_listing_order_and_counts_skipped_files(
    settings: Settings, s3_client: Any, bucket: str, target_pngs: list[bytes], tmp_path: Path
) -> None:
    # More keys than the fetch window, so the window slides several times.
    count = dataset.WINDOW * 3 + 5
    usable = _upload(s3_client, bucket, target_pngs, count)

    staged = stage_images(f"s3://{bucket}/data", tmp_path, settings)

    assert staged.paths == [tmp_path / local_name(key) for key in usable]
    assert all(path.is_file() for path in staged.paths)
    assert staged.skipped.counts == {"not_an_image_extension": 1, "not_an_image": count - len(usable)}


def test_staging_stops_at_max_images(
    settings: Settings, s3_client: Any, bucket: str, target_pngs: list[bytes], tmp_path: Path
) -> None:
    usable = _upload(s3_client, bucket, target_pngs, dataset.WINDOW * 2)

    staged = stage_images(f"s3://{bucket}/data/", tmp_path, settings, max_images=10)

    assert staged.paths == [tmp_path / local_name(key) for key in usable[:10]]
    # Only the corrupt files met before the tenth usable one are counted (keys 3 and 10).
    assert staged.skipped.counts == {"not_an_image": 2}


def test_a_prefix_without_images_fails_with_the_reasons(
    settings: Settings, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=bucket, Key="data/a.png", Body=b"not a png")

    with pytest.raises(DatasetError, match="no usable images.*not_an_image"):
        stage_images(f"s3://{bucket}/data", tmp_path, settings)
