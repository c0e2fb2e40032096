"""S3ObjectStore against a real S3-compatible HTTP server (moto_server)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.config import Settings, StorageSettings
from services.errors import BucketNotFound, InvalidRequest, ObjectNotFound, ObjectTooLarge
from services.storage import keys
from services.storage.object_store import S3ObjectStore, local_copy, make_s3_client, open_store, publish


def _count_calls(client: Any) -> Counter[str]:
    """Count S3 API calls by operation name as they are sent (botocore's event hooks)."""
    calls: Counter[str] = Counter()

    def record(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client.meta.events.register("before-call.s3", record)
    return calls


def _record_put_keys(client: Any) -> list[str]:
    """The keys of PutObject calls, in the order they were sent."""
    puts: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        puts.append(params["Key"])

    client.meta.events.register("before-parameter-build.s3.PutObject", record)
    return puts


@pytest.fixture
def store(s3_client: Any, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(s3_client, bucket)


def test_client_config_for_custom_endpoint(s3_client: Any, moto_s3: str) -> None:
    assert s3_client.meta.endpoint_url == moto_s3
    assert s3_client.meta.config.s3["addressing_style"] == "path"
    assert s3_client.meta.config.retries["mode"] == "standard"
    aws = make_s3_client(StorageSettings(artifacts_uri="s3://must-artifacts", s3_region="eu-west-1"))
    assert aws.meta.region_name == "eu-west-1"


def test_round_trip_and_exists(store: S3ObjectStore, bucket: str) -> None:
    store.check_access()
    store.write_bytes("a/b.bin", b"hello")
    assert store.read_bytes("a/b.bin", max_bytes=5) == b"hello"
    assert store.exists("a/b.bin")
    assert not store.exists("a/missing.bin")
    assert store.uri("a/b.bin") == f"s3://{bucket}/a/b.bin"


def test_missing_key_and_bucket(s3_client: Any, store: S3ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="a/missing"):
        store.read_bytes("a/missing", max_bytes=10)
    gone = S3ObjectStore(s3_client, "no-such-bucket-here")
    operations: list[Callable[[], object]] = [
        gone.check_access,
        lambda: list(gone.iter_keys()),
        lambda: gone.read_bytes("k", max_bytes=1),
        lambda: gone.write_bytes("k", b"x"),
        lambda: gone.exists("k"),
    ]
    for operation in operations:
        with pytest.raises(BucketNotFound, match="no-such-bucket-here"):
            operation()


def test_too_large_is_refused_before_the_body_is_fetched(store: S3ObjectStore) -> None:
    store.write_bytes("big.bin", b"x" * 1000)
    calls = _count_calls(store.client)
    with pytest.raises(ObjectTooLarge, match="1000 bytes"):
        store.read_bytes("big.bin", max_bytes=999)
    assert calls["HeadObject"] == 1
    assert calls["GetObject"] == 0
    assert store.read_bytes("big.bin", max_bytes=1000) == b"x" * 1000


def test_listing_is_paginated_and_streamed(s3_client: Any, bucket: str) -> None:
    names = [f"imgs/{i:04d}.jpg" for i in range(150)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_client.put_object(Bucket=bucket, Key=key, Body=b"x"), names))
    s3_client.put_object(Bucket=bucket, Key="other/x.jpg", Body=b"x")
    store = S3ObjectStore(s3_client, bucket, page_size=50)
    calls = _count_calls(s3_client)
    listing = store.iter_keys("imgs/")
    first = next(listing)
    assert (first.key, first.size) == ("imgs/0000.jpg", 1)
    assert calls["ListObjectsV2"] == 1
    rest = [info.key for info in listing]
    assert [first.key, *rest] == names
    assert calls["ListObjectsV2"] == 3


def test_store_prefix_is_hidden_from_callers(s3_client: Any, bucket: str) -> None:
    store = S3ObjectStore(s3_client, bucket, prefix="env/prod")
    store.write_bytes("x.json", b"{}")
    assert s3_client.head_object(Bucket=bucket, Key="env/prod/x.json")["ContentLength"] == 2
    assert [info.key for info in store.iter_keys()] == ["x.json"]
    assert store.uri("x.json") == f"s3://{bucket}/env/prod/x.json"


def test_delete_prefix(store: S3ObjectStore) -> None:
    for key in ("adaptations/j1/a", "adaptations/j1/b/c", "adaptations/j2/a"):
        store.write_bytes(key, b"1")
    assert store.delete_prefix("adaptations/j1/") == 2
    assert [info.key for info in store.iter_keys()] == ["adaptations/j2/a"]
    with pytest.raises(InvalidRequest, match="non-empty prefix"):
        store.delete_prefix("")


def test_upload_and_download(store: S3ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01" * 1000)
    store.upload_file("w/weights.bin", source)
    target = tmp_path / "out" / "copy.bin"
    store.download_file("w/weights.bin", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(ObjectNotFound):
        store.download_file("w/missing.bin", tmp_path / "out" / "missing.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]


def test_publish_uploads_in_order_pointer_last(store: S3ObjectStore, tmp_path: Path) -> None:
    job = "job-1"
    files = []
    for key in (keys.classifier_weights_key(job), keys.metrics_key(job), keys.classifier_manifest_key(job)):
        path = tmp_path / key.replace("/", "_")
        path.write_bytes(key.encode())
        files.append((key, path))
    puts = _record_put_keys(store.client)
    publish(store, files)
    assert puts == [key for key, _ in files]
    with pytest.raises(InvalidRequest, match="missing"):
        publish(store, [("x", tmp_path / "absent.bin"), *files])
    assert len(puts) == 3


def test_open_store_for_s3(s3_client: Any, bucket: str) -> None:
    store, prefix = open_store(f"s3://{bucket}/datasets/cats/", Settings(), client=s3_client)
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, prefix) == (bucket, "datasets/cats/")


def test_local_copy_downloads_an_s3_file_once_and_passes_local_paths_through(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=bucket, Key="models/tiny/weights.safetensors", Body=b"weights")
    uri = f"s3://{bucket}/models/tiny/weights.safetensors"
    calls = _count_calls(s3_client)

    first = local_copy(uri, tmp_path / "cache", Settings(), client=s3_client)
    again = local_copy(uri, tmp_path / "cache", Settings(), client=s3_client)

    assert first == again
    assert Path(first).name == "weights.safetensors"
    assert Path(first).read_bytes() == b"weights"
    assert calls["GetObject"] == 1
    assert local_copy("/models/w.pt", tmp_path, Settings()) == "/models/w.pt"
    assert local_copy((tmp_path / "w.pt").as_uri(), tmp_path, Settings()) == str(tmp_path / "w.pt")
    with pytest.raises(ObjectNotFound):
        local_copy(f"s3://{bucket}/models/missing.pt", tmp_path / "cache", Settings(), client=s3_client)
