"""The object store interface shared by the S3 and local-folder implementations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its key relative to the store, its size, and its ETag when known."""

    key: str
    size: int
    etag: str | None = None


class ObjectStore(Protocol):
    """A flat key -> bytes store; keys use `/` and are relative to the store's root."""

    def iter_keys(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Stream the objects whose key starts with `prefix`, in key order, page by page."""
        ...

    def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """Read a whole object; ObjectTooLarge if it exceeds `max_bytes`, ObjectNotFound if missing."""
        ...

    def open_stream(self, key: str, *, chunk_bytes: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
        """An object's size and its bytes in chunks; ObjectNotFound is raised here, before any chunk."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object; readers see the old object or the new one, never a partial one."""
        ...

    def upload_file(self, key: str, path: Path) -> None:
        """Store a local file under `key`."""
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Copy an object to a local file, replacing it only once the copy is complete."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object has this key."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a non-empty prefix; return how many were deleted."""
        ...

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects; a key with no object is not an error."""
        ...

    def check_access(self) -> None:
        """Raise BucketNotFound or StorageError unless the store can be used."""
        ...

    def uri(self, key: str) -> str:
        """The URI naming `key` in this store (for job records and messages)."""
        ...
