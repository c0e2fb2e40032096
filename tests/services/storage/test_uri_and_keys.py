"""Storage URI parsing and the object key layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.errors import InvalidRequest
from services.storage import keys
from services.storage.uri import S3URI, FileURI, parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://must-artifacts", S3URI("must-artifacts", "")),
        ("s3://must-artifacts/", S3URI("must-artifacts", "")),
        ("s3://data.bucket-1/cats/train/", S3URI("data.bucket-1", "cats/train/")),
        ("S3://data/x.jpg", S3URI("data", "x.jpg")),
        ("file:///srv/data/my%20images", FileURI(Path("/srv/data/my images"))),
        ("file://localhost/srv/data", FileURI(Path("/srv/data"))),
    ],
)
def test_parse_valid(uri: str, expected: object) -> None:
    assert parse_uri(uri) == expected


def test_relative_file_uri_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("file://./.must/store") == FileURI(tmp_path.resolve() / ".must" / "store")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "unsupported storage scheme 'gs'"),
        ("http://host/x", "unsupported storage scheme"),
        ("/data/images", "not a URI"),
        ("s3://Bad_Bucket/x", "valid S3 bucket"),
        ("s3:///x", "valid S3 bucket"),
        ("file://", "names no path"),
    ],
)
def test_parse_invalid(uri: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_uri(uri)


def test_uri_round_trip() -> None:
    assert str(parse_uri("s3://b-1/a/b")) == "s3://b-1/a/b"
    assert str(parse_uri("file:///tmp/x%20y")) == "file:///tmp/x%20y"


def test_key_layout() -> None:
    job = "0b4f7a34-6c1e-4f1e-9a53-2f7d1f6c9b10"
    base = f"adaptations/{job}/"
    assert keys.adaptation_prefix(job) == base
    name = keys.checkpoint_name(500, ".safetensors")
    assert name == "step-000500.safetensors"
    assert keys.checkpoint_key(job, name) == f"{base}checkpoints/step-000500.safetensors"
    assert keys.latest_checkpoint_key(job) == f"{base}checkpoints/latest.json"
    assert keys.classifier_weights_key(job) == f"{base}classifier/model.safetensors"
    assert keys.classifier_manifest_key(job) == f"{base}classifier/manifest.json"
    assert keys.metrics_key(job) == f"{base}metrics.jsonl"
    assert keys.join_key("a/b/", "/c") == "a/b/c"
    assert keys.join_key("", "c") == "c"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a\\b"])
def test_keys_refuse_escaping_segments(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        keys.adaptation_prefix(bad)
    with pytest.raises(InvalidRequest):
        keys.checkpoint_key("job", bad)
