"""LocalObjectStore: the file:// equivalent of the S3 store, with atomic writes and no path traversal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from services.config import Settings
from services.errors import BucketNotFound, InvalidRequest, ObjectNotFound, ObjectTooLarge
from services.storage.object_store import LocalObjectStore, open_store, publish


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    root = tmp_path / "store"
    root.mkdir()
    return LocalObjectStore(root)


def test_round_trip_is_atomic(store: LocalObjectStore) -> None:
    store.write_bytes("a/b/c.bin", b"one")
    store.write_bytes("a/b/c.bin", b"two")
    assert store.read_bytes("a/b/c.bin", max_bytes=3) == b"two"
    assert store.exists("a/b/c.bin")
    assert not store.exists("a/b/d.bin")
    assert [p.name for p in (store.root / "a" / "b").iterdir()] == ["c.bin"]
    assert store.uri("a/b/c.bin") == (store.root / "a/b/c.bin").as_uri()


def test_listing_matches_s3_order_and_prefixes(store: LocalObjectStore) -> None:
    keys = ["a.txt", "a/b", "a/c/d", "img1.jpg", "images/x.jpg", "z"]
    for key in keys:
        store.write_bytes(key, b"12")
    (store.root / ".must-tmp-partial").write_bytes(b"in flight")
    listing = store.iter_keys()
    assert next(listing).key == "a.txt"
    assert ["a.txt", *(info.key for info in listing)] == sorted(keys)
    assert [info.key for info in store.iter_keys("im")] == ["images/x.jpg", "img1.jpg"]
    assert [info.key for info in store.iter_keys("a/")] == ["a/b", "a/c/d"]
    assert [info.key for info in store.iter_keys("a/c")] == ["a/c/d"]
    assert list(store.iter_keys("nothing/here/")) == []
    assert {info.size for info in store.iter_keys()} == {2}


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\..\\x", ""])
def test_path_traversal_is_refused(store: LocalObjectStore, key: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: store.read_bytes(key, max_bytes=10),
        lambda: store.write_bytes(key, b"x"),
        lambda: store.exists(key),
    ]
    for operation in operations:
        with pytest.raises(InvalidRequest, match="invalid object key"):
            operation()
    assert not (store.root.parent / "x").exists()


def test_listing_refuses_escaping_prefix(store: LocalObjectStore) -> None:
    with pytest.raises(InvalidRequest):
        list(store.iter_keys("../"))


def test_read_limits_and_missing(store: LocalObjectStore, tmp_path: Path) -> None:
    store.write_bytes("big", b"x" * 100)
    with pytest.raises(ObjectTooLarge, match="100 bytes"):
        store.read_bytes("big", max_bytes=99)
    with pytest.raises(ObjectNotFound, match="nope"):
        store.read_bytes("nope", max_bytes=10)
    gone = LocalObjectStore(tmp_path / "no-such-folder")
    for operation in (
        gone.check_access,
        lambda: list(gone.iter_keys()),
        lambda: gone.read_bytes("k", max_bytes=1),
    ):
        with pytest.raises(BucketNotFound):
            operation()


def test_delete_prefix_prunes_empty_folders(store: LocalObjectStore) -> None:
    for key in ("adaptations/j1/a", "adaptations/j1/b/c", "adaptations/j2/a"):
        store.write_bytes(key, b"1")
    assert store.delete_prefix("adaptations/j1/") == 2
    assert not (store.root / "adaptations" / "j1").exists()
    assert [info.key for info in store.iter_keys()] == ["adaptations/j2/a"]
    with pytest.raises(InvalidRequest):
        store.delete_prefix("")


def test_upload_download_and_publish(store: LocalObjectStore, tmp_path: Path) -> None:
    weights, pointer = tmp_path / "w.bin", tmp_path / "latest.json"
    weights.write_bytes(b"w" * 10)
    pointer.write_text('{"step": 5}')
    publish(store, [("ckpt/w.bin", weights), ("ckpt/latest.json", pointer)])
    assert store.read_bytes("ckpt/latest.json", max_bytes=100) == b'{"step": 5}'
    target = tmp_path / "dl" / "w.bin"
    store.download_file("ckpt/w.bin", target)
    assert target.read_bytes() == b"w" * 10
    with pytest.raises(ObjectNotFound):
        store.download_file("ckpt/missing", tmp_path / "dl" / "missing")
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["w.bin"]


def test_open_store_for_files(tmp_path: Path) -> None:
    folder = tmp_path / "artifacts"
    store, prefix = open_store(folder.as_uri(), Settings(), create=True)
    assert isinstance(store, LocalObjectStore)
    assert (store.root, prefix) == (folder, "")
    store.write_bytes("model.pt", b"m")
    file_store, key = open_store((folder / "model.pt").as_uri(), Settings())
    assert file_store.read_bytes(key, max_bytes=1) == b"m"
