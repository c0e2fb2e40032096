"""Copy a local folder of images into S3 or MinIO, where adaptation jobs read them.

The S3 client comes from boto3's usual chain: credentials from `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (or a profile), the server from `--endpoint-url` or `AWS_ENDPOINT_URL`
(for MinIO: http://localhost:9000).
https://boto3.amazonaws.com/v1/documentation/api/latest/guide/configuration.html
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import InvalidRequest
from services.storage.uri import S3URI, parse_uri

# The extensions the worker lists as images (services.must.data.IMAGE_EXTENSIONS, which loads torch).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


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


def upload(
    plan: UploadPlan,
    s3_client: Any,
    *,
    workers: int = 8,
    on_done: Callable[[Path], None] | None = None,
) -> int:
    """Upload the plan's files with `workers` threads (boto3 clients are thread-safe); return the count."""

    def put(item: tuple[Path, str]) -> None:
        path, key = item
        s3_client.upload_file(str(path), plan.bucket, key)
        if on_done is not None:
            on_done(path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # list() re-raises the first failure (a missing bucket, refused credentials) here.
        list(pool.map(put, plan.items))
    return len(plan.items)
