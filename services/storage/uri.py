"""Parse storage URIs (`s3://bucket/prefix`, `file:///abs/path`) into typed values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from services.errors import InvalidRequest

# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class S3URI:
    """An S3 (or S3-compatible) location: a bucket and a key or key prefix without a leading slash."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True, slots=True)
class FileURI:
    """A local file or folder, always absolute."""

    path: Path

    def __str__(self) -> str:
        return self.path.as_uri()


StorageURI = S3URI | FileURI


def parse_uri(uri: str) -> StorageURI:
    """Parse `s3://bucket/prefix` or `file:///path` (relative `file://./x` resolves against the cwd)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidRequest(f"{uri!r} is not a URI: use s3://bucket/prefix or file:///absolute/path")
    if scheme.lower() == "s3":
        return _parse_s3(uri, rest)
    if scheme.lower() == "file":
        return _parse_file(uri, rest)
    raise InvalidRequest(f"unsupported storage scheme {scheme!r} in {uri!r}: use s3:// or file://")


def _parse_s3(uri: str, rest: str) -> S3URI:
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise InvalidRequest(f"{uri!r} does not start with a valid S3 bucket name")
    return S3URI(bucket=bucket, prefix=prefix)


def _parse_file(uri: str, rest: str) -> FileURI:
    # file://localhost/x is the RFC 8089 spelling of file:///x; any other host is not local.
    if rest.startswith("localhost/"):
        rest = rest.removeprefix("localhost")
    if not rest:
        raise InvalidRequest(f"{uri!r} names no path")
    return FileURI(path=Path(unquote(rest)).resolve())
