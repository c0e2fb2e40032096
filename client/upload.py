"""Copy a local folder of images into S3 or MinIO, where adaptation jobs read them.

The S3 client comes from boto3's usual chain: credentials from `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (or a profile), the server from `--endpoint-url` or `AWS_ENDPOINT_URL`
(for MinIO: http://localhost:9000).
https://boto3.amazonaws.com/v1/documentation/api/latest/guide/configuration.html
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import InvalidRequest
from services.storage.uri import S3URI, parse_uri

# The extensions the worker lists as images (services.must.data.IMAGE_EXTENSIONS, which loads torch).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# boto3's default multipart threshold and part size (TransferConfig), which shape the ETag of an upload.
MULTIPART_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class UploadPlan:
    """Which files go where: (local path, key) pairs, and how many files were left out."""

    bucket: str
    items: list[tuple[Path, str]]
    skipped: int


def s3_location(uri: str) -> S3URI:
    """The bucket and prefix of an `s3://` URI; ValueError for anything else."""
    try:
        location = parse_uri(uri)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
    if not isinstance(location, S3URI):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    return location


def plan_upload(folder: Path, uri: str) -> UploadPlan:
    """Every image file under `folder` (recursively, hidden files and folders left out) and its key."""
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    location = s3_location(uri)
    prefix = (
        location.prefix if not location.prefix or location.prefix.endswith("/") else location.prefix + "/"
    )
    items, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        items.append((path, prefix + relative.as_posix()))
    return UploadPlan(location.bucket, items, skipped)


def local_etag(path: Path, part_bytes: int = MULTIPART_BYTES) -> str:
    """The ETag S3 gives this file once boto3 uploads it: the MD5 of its bytes, or, for a file it sends
    in parts (from `part_bytes` on), the MD5 of the parts' MD5s and `-<parts>`.
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html"""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size < part_bytes:
            return hashlib.md5(fh.read(), usedforsecurity=False).hexdigest()
        parts = [
            hashlib.md5(chunk, usedforsecurity=False).digest()
            for chunk in iter(lambda: fh.read(part_bytes), b"")
        ]
    return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


def stored_objects(plan: UploadPlan, s3_client: Any) -> dict[str, tuple[int, str]]:
    """{key: (size, ETag)} of the objects already under the plan's common prefix (one listing)."""
    prefix = os.path.commonprefix([key for _, key in plan.items]).rpartition("/")[0]
    found: dict[str, tuple[int, str]] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=plan.bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            found[obj["Key"]] = (int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
    return found


def upload(
    plan: UploadPlan,
    s3_client: Any,
    *,
    workers: int = 8,
    on_done: Callable[[Path], None] | None = None,
) -> tuple[int, int]:
    """Upload the plan's files with `workers` threads (boto3 clients are thread-safe), skipping each
    whose key already holds an object of the same size and checksum; (uploaded, already there)."""
    stored = stored_objects(plan, s3_client)

    def put(item: tuple[Path, str]) -> bool:
        path, key = item
        there = stored.get(key)
        same = there is not None and there[0] == path.stat().st_size and there[1] == local_etag(path)
        if not same:
            s3_client.upload_file(str(path), plan.bucket, key)
        if on_done is not None:
            on_done(path)
        return not same

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # list() re-raises the first failure (a missing bucket, refused credentials) here.
        sent = sum(pool.map(put, plan.items))
    return sent, len(plan.items) - sent
