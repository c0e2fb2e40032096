"""RetryingStore: transient store failures are retried with backoff, others raised at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.errors import ObjectNotFound, StorageUnavailable
from services.storage.base import ObjectInfo
from services.storage.local import LocalObjectStore
from services.storage.retrying import RetryingStore


class Flaky(LocalObjectStore):
    """A local store whose listing breaks off after `fail_after` keys, `failures` times."""

    def __init__(self, root: Path, *, failures: int, fail_after: int = 2) -> None:
        super().__init__(root)
        self.failures = failures
        self.fail_after = fail_after
        self.reads = 0

    def iter_keys(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for count, info in enumerate(super().iter_keys(prefix)):
            if count == self.fail_after and self.failures:
                self.failures -= 1
                raise StorageUnavailable("the store went away")
            yield info

    def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        self.reads += 1
        if self.reads <= self.failures:
            raise StorageUnavailable("the store went away")
        return super().read_bytes(key, max_bytes=max_bytes)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i in range(6):
        (tmp_path / f"k{i}").write_bytes(b"x")
    return tmp_path


def test_a_listing_that_breaks_off_resumes_after_its_last_key(root: Path) -> None:
    store = RetryingStore(Flaky(root, failures=2), budget_s=10)

    assert [info.key for info in store.iter_keys()] == [f"k{i}" for i in range(6)]


def test_reads_are_retried_until_the_store_answers(root: Path) -> None:
    store = RetryingStore(Flaky(root, failures=2), budget_s=10)

    assert store.read_bytes("k1", max_bytes=10) == b"x"


def test_past_the_budget_the_error_is_raised(root: Path) -> None:
    store = RetryingStore(Flaky(root, failures=1000), budget_s=1)
    start = time.monotonic()

    with pytest.raises(StorageUnavailable):
        store.read_bytes("k1", max_bytes=10)
    assert time.monotonic() - start < 5


def test_errors_about_the_request_are_not_retried(root: Path) -> None:
    store = RetryingStore(LocalObjectStore(root), budget_s=30)
    start = time.monotonic()

    with pytest.raises(ObjectNotFound):
        store.read_bytes("missing", max_bytes=10)
    assert time.monotonic() - start < 0.5
