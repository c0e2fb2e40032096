"""The object store entry points: the interface, both implementations, `open_store` and `publish`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.config import Settings
from services.errors import InvalidRequest, ObjectNotFound
from services.storage.base import ObjectInfo, ObjectStore
from services.storage.local import LocalObjectStore
from services.storage.s3 import S3ObjectStore, make_s3_client
from services.storage.uri import FileURI, StorageURI, parse_uri

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3ObjectStore",
    "make_s3_client",
    "open_store",
    "publish",
]


def open_store(
    uri: str | StorageURI, settings: Settings, *, client: Any | None = None, create: bool = False
) -> tuple[ObjectStore, str]:
    """The store holding `uri` and the key (or key prefix) `uri` names inside it.

    S3: the bucket's store and the URI's key. file://: a folder's store and "" (or, for an
    existing file, its folder's store and the file name). `create` makes a missing local folder;
    buckets are left to the infrastructure.
    """
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(parsed, FileURI):
        return _open_local(parsed.path, create=create)
    s3 = client if client is not None else make_s3_client(settings.storage)
    return S3ObjectStore(s3, parsed.bucket, page_size=settings.limits.list_page_size), parsed.prefix


def local_copy(location: str, folder: Path, settings: Settings, *, client: Any | None = None) -> str:
    """A local path for a file named by a path, a `file://` URI or an `s3://` URI.

    An `s3://` object is downloaded once, into `folder/<hash of the URI>/<its name>` (the name
    keeps its suffix, which loaders read); local files are returned where they are.
    """
    if "://" not in location:
        return location
    parsed = parse_uri(location)
    if isinstance(parsed, FileURI):
        return str(parsed.path)
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = folder / digest / (parsed.prefix.rsplit("/", 1)[-1] or "file")
    if not target.is_file():
        if not parsed.prefix:
            raise ObjectNotFound(location)
        store, key = open_store(parsed, settings, client=client)
        store.download_file(key, target)
    return str(target)


def _open_local(path: Path, *, create: bool) -> tuple[ObjectStore, str]:
    if path.is_file():
        return LocalObjectStore(path.parent), path.name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return LocalObjectStore(path), ""


def publish(store: ObjectStore, files: Sequence[tuple[str, Path]]) -> None:
    """Upload files in the given order (weights first, pointer/manifest last), after checking all exist.

    A reader that finds the last file (the pointer) can trust every file before it is complete.
    """
    missing = [str(path) for _, path in files if not Path(path).is_file()]
    if missing:
        raise InvalidRequest(f"cannot publish, local files missing: {', '.join(missing)}")
    for key, path in files:
        store.upload_file(key, Path(path))
