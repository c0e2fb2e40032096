"""An object store that retries, with backoff, the operations the store could not serve for a while.

A training job must not fail because its object store was away for a few seconds (a restart, a
network blip): every operation that fails with `StorageUnavailable` (unreachable, a 5xx,
throttling) is tried again with exponential backoff until `budget_s` seconds have passed since
its first try, then the error is raised for the caller (the pipeline puts the job back in the
queue). Errors that say something about the request itself (missing object or bucket, too large,
access denied) are raised at once. A listing that fails midway starts again after the last key
it yielded, since stores list in key order.
https://tenacity.readthedocs.io/en/latest/
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from services.errors import StorageUnavailable
from services.storage.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff between tries: 0.5 s, then doubling with jitter, at most 8 s apart.
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 8.0


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("object store unavailable (try %d), retrying: %s", state.attempt_number, error)


def retry_storage(operation: Callable[[], T], budget_s: float) -> T:
    """`operation()`, tried again with backoff while it fails with StorageUnavailable, for `budget_s`."""
    return RetryingStore.policy(budget_s)(operation)


class RetryingStore:
    """Wraps an ObjectStore; every call is retried on StorageUnavailable for up to `budget_s` seconds."""

    def __init__(self, store: ObjectStore, budget_s: float) -> None:
        self.store = store
        self.budget_s = budget_s

    @staticmethod
    def policy(budget_s: float) -> Retrying:
        """The retry policy: StorageUnavailable only, exponential backoff, for `budget_s` seconds."""
        return Retrying(
            retry=retry_if_exception_type(StorageUnavailable),
            stop=stop_after_delay(budget_s),
            wait=wait_exponential_jitter(multiplier=FIRST_WAIT_S, max=MAX_WAIT_S),
            before_sleep=_log_retry,
            reraise=True,
        )

    def _retrying(self) -> Retrying:
        return self.policy(self.budget_s)

    def _call(self, operation: Callable[[], T]) -> T:
        result: T = self._retrying()(operation)
        return result

    def iter_keys(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The listing, resumed after the last yielded key when the store fails midway."""
        last: str | None = None
        for attempt in self._retrying():
            with attempt:
                for info in self.store.iter_keys(prefix):
                    if last is not None and info.key <= last:
                        continue
                    yield info
                    last = info.key

    def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        return self._call(lambda: self.store.read_bytes(key, max_bytes=max_bytes))

    def open_stream(self, key: str, *, chunk_bytes: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
        """Opening is retried; a failure while reading the chunks is not."""
        return self._call(lambda: self.store.open_stream(key, chunk_bytes=chunk_bytes))

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(lambda: self.store.write_bytes(key, data))

    def upload_file(self, key: str, path: Path) -> None:
        self._call(lambda: self.store.upload_file(key, path))

    def download_file(self, key: str, path: Path) -> None:
        self._call(lambda: self.store.download_file(key, path))

    def exists(self, key: str) -> bool:
        return self._call(lambda: self.store.exists(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._call(lambda: self.store.delete_prefix(prefix))

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects (retried as a whole; deleting a missing object is not an error)."""
        self._call(lambda: self.store.delete_keys(keys))

    def check_access(self) -> None:
        self._call(self.store.check_access)

    def uri(self, key: str) -> str:
        return self.store.uri(key)
