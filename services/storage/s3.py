"""S3 and S3-compatible (MinIO) object store on a boto3 client."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.config import StorageSettings
from services.errors import (
    BucketNotFound,
    InvalidRequest,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    StorageUnavailable,
)
from services.storage.base import ObjectInfo
from services.storage.keys import join_key

log = logging.getLogger(__name__)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden"})
# Answers that say "try again later" (throttling, timeouts, server errors).
# https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
_TRANSIENT_CODES = frozenset(
    {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
)
# DeleteObjects takes at most 1000 keys per request.
# https://docs.aws.amazon.com/AmazonS3/latest/API/API_DeleteObjects.html
_DELETE_BATCH = 1000


def make_s3_client(storage: StorageSettings, *, session: boto3.session.Session | None = None) -> Any:
    """An S3 client for AWS or, with `s3_endpoint_url`, MinIO/moto; credentials from boto3's chain."""
    custom_endpoint = storage.s3_endpoint_url is not None
    # botocore >= 1.36 adds CRC checksums to every upload by default ("when_supported"), which
    # several S3-compatible servers reject; there, only send them where the API requires it.
    # https://docs.aws.amazon.com/sdkref/latest/guide/feature-dataintegrity.html (boto/boto3#4392)
    checksums: Literal["when_required", "when_supported"] = (
        "when_required" if custom_endpoint else "when_supported"
    )
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        # "standard" retries throttling and 5xx with backoff; the legacy default mode retries less.
        # https://boto3.amazonaws.com/v1/documentation/api/latest/guide/retries.html
        retries={"max_attempts": 5, "mode": "standard"},
        # Data loaders and multipart transfers share one client; the default pool is only 10.
        max_pool_connections=32,
        # MinIO serves buckets as paths unless virtual-host DNS is configured.
        s3={"addressing_style": "path"} if custom_endpoint else None,
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    session = session or boto3.session.Session()
    return session.client(
        "s3", endpoint_url=storage.s3_endpoint_url, region_name=storage.s3_region, config=config
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3ObjectStore:
    """An ObjectStore on one bucket, optionally under a key prefix that callers never see."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, page_size: int = 1000) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.page_size = page_size

    def _full(self, key: str) -> str:
        return join_key(self.prefix, key) if self.prefix else key

    def uri(self, key: str) -> str:
        """The s3:// URI of `key`."""
        return f"s3://{self.bucket}/{self._full(key)}"

    @contextlib.contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        """Turn boto errors into domain errors that name the bucket or object."""
        try:
            yield
        except ClientError as exc:
            raise self._translate(exc, key) from exc
        except (S3UploadFailedError, S3TransferFailedError) as exc:
            if "NoSuchBucket" in str(exc):
                raise BucketNotFound(self.bucket) from exc
            if any(code in str(exc) for code in _DENIED_CODES):
                raise StorageError(f"access denied to {self.uri(key)!r}: check the S3 credentials") from exc
            log.warning("transfer of %s failed: %s", self.uri(key), exc)
            raise StorageUnavailable(
                f"the transfer of {self.uri(key)!r} failed; the object store may be down"
            ) from exc
        except BotoCoreError as exc:
            # The exception's text names the endpoint's address, which clients are not shown.
            log.warning("object store unreachable for bucket %s: %s", self.bucket, exc)
            raise StorageUnavailable(f"cannot reach the object store (bucket {self.bucket!r})") from exc

    def _translate(self, exc: ClientError, key: str) -> StorageError:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return BucketNotFound(self.bucket)
        if code in _NOT_FOUND_CODES:
            # A HEAD answers a bare 404 for a missing bucket too; ask the bucket to tell them apart.
            return BucketNotFound(self.bucket) if self._bucket_missing() else ObjectNotFound(self.uri(key))
        if code in _DENIED_CODES:
            return StorageError(f"access denied to {self.uri(key)!r}: check the S3 credentials and policy")
        if code in {"412", "PreconditionFailed"}:
            return StorageError(f"object {self.uri(key)!r} changed while it was being read")
        if code in _TRANSIENT_CODES:
            return StorageUnavailable(f"the object store failed a request on {self.uri(key)!r} ({code})")
        return StorageError(f"S3 request on {self.uri(key)!r} failed: {code}")

    def _bucket_missing(self) -> bool:
        """True only when S3 says the bucket does not exist (denied or unreachable is not "missing")."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return _error_code(exc) in _NOT_FOUND_CODES | {"NoSuchBucket"}
        except BotoCoreError:
            return False
        return False

    def check_access(self) -> None:
        """HEAD the bucket: BucketNotFound if missing, StorageError if denied or unreachable."""
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)

    def iter_keys(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Stream ListObjectsV2 pages; only one page is held in memory at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self._full(prefix), PaginationConfig={"PageSize": self.page_size}
        )
        with self._errors(prefix):
            for page in pages:
                for obj in page.get("Contents", ()):
                    etag = obj.get("ETag", "").strip('"') or None
                    yield ObjectInfo(key=obj["Key"][len(self.prefix) :], size=obj["Size"], etag=etag)

    def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """HEAD for the size first, then GET the same version (If-Match) and cap the read."""
        full = self._full(key)
        with self._errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
            if head["ContentLength"] > max_bytes:
                raise ObjectTooLarge(self.uri(key), max_bytes, head["ContentLength"])
            body = self.client.get_object(Bucket=self.bucket, Key=full, IfMatch=head["ETag"])["Body"]
            try:
                data: bytes = body.read(max_bytes + 1)
            finally:
                body.close()
        if len(data) > max_bytes:
            raise ObjectTooLarge(self.uri(key), max_bytes)
        return data

    def open_stream(self, key: str, *, chunk_bytes: int = 1 << 20) -> tuple[int, Iterator[bytes]]:
        """GET the object now (so a missing one raises here) and stream its body in chunks."""
        with self._errors(key):
            answer = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        body = answer["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                with self._errors(key):
                    yield from body.iter_chunks(chunk_bytes)
            finally:
                body.close()

        return int(answer["ContentLength"]), chunks()

    def presigned_get(self, key: str, expires_s: int, *, client: Any | None = None) -> str:
        """A URL that lets anyone holding it GET the object for `expires_s` seconds, without credentials.

        `client` presigns for another endpoint address (the one clients reach), as signing is local.
        https://boto3.amazonaws.com/v1/documentation/api/latest/guide/s3-presigned-urls.html
        """
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        signer = client if client is not None else self.client
        url: str = signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return url

    def write_bytes(self, key: str, data: bytes) -> None:
        """PUT one object (S3 makes a PUT visible all at once)."""
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def upload_file(self, key: str, path: Path) -> None:
        """Upload a local file, in parts when it is large (boto3's managed transfer)."""
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._full(key))

    def download_file(self, key: str, path: Path) -> None:
        """Download into a temporary file beside `path`, then rename it into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, self._full(key), tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """HEAD the object; BucketNotFound rather than False when the bucket itself is missing."""
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ObjectNotFound:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` in batches of 1000; refuses an empty prefix."""
        if not prefix:
            raise InvalidRequest("refusing to delete a whole bucket: give a non-empty prefix")
        deleted, batch = 0, []
        for info in self.iter_keys(prefix):
            batch.append(info.key)
            if len(batch) == _DELETE_BATCH:
                deleted += self._delete_batch(batch)
                batch = []
        return deleted + (self._delete_batch(batch) if batch else 0)

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects, 1000 per request (S3 does not mind keys with no object)."""
        for start in range(0, len(keys), _DELETE_BATCH):
            self._delete_batch(keys[start : start + _DELETE_BATCH])

    def _delete_batch(self, keys: list[str]) -> int:
        objects = [{"Key": self._full(key)} for key in keys]
        with self._errors(keys[0]):
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            )
        if response.get("Errors"):
            first = response["Errors"][0]
            raise StorageError(
                f"could not delete {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )
        return len(keys)
