"""The whole platform as separate processes on loopback, for end-to-end and client tests.

`running_stack()` starts the control API and the inference service under uvicorn and a Celery
worker process (services.launcher), on a fresh PostgreSQL database, a Redis database of their
own as broker, and a bucket on the moto S3 server, with API keys required (the development
environment). Tests talk to it only over HTTP and S3, as users do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from PIL import Image

from bench.shapes import png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.db.migrate import upgrade
from services.launcher import Platform

# A Redis database of its own (the API tests use 15, the worker test 14).
BROKER_URL = "redis://127.0.0.1:6379/13"
API_KEY = "e2e-test-key-0123456789"
TERMINAL = {"succeeded", "failed", "cancelled"}
MODEL_PREFIX = "models/tiny-clip/"

# Short leases so that a killed worker's job is taken back within seconds.
WORKER_ENV = {
    "MUST_WORKER__HEARTBEAT_SECONDS": "1",
    "MUST_WORKER__LEASE_SECONDS": "4",
    "MUST_WORKER__RECONCILE_EVERY_SECONDS": "1",
    "MUST_WORKER__PROGRESS_EVERY_SECONDS": "1",
    # Several workers on one machine would contend for the metrics port; tests/worker covers it.
    "MUST_METRICS__WORKER_PORT": "0",
}


@dataclass
class Stack:
    """A running platform and the handles a test needs to use it like a client."""

    platform: Platform
    s3: Any
    bucket: str
    api_key: str = API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "X-API-Key": self.api_key}

    def control(self) -> httpx.Client:
        """An HTTP client for the control API, authenticated."""
        return httpx.Client(base_url=self.platform.control_url, headers=self.headers, timeout=60)

    def inference(self) -> httpx.Client:
        """An HTTP client for the inference service, authenticated."""
        return httpx.Client(base_url=self.platform.inference_url, headers=self.headers, timeout=120)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Upload one object to the stack's bucket; return its s3:// URI."""
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def put_images(self, prefix: str, images: Iterable[Image.Image]) -> str:
        """Upload images as PNGs under `prefix`; return the prefix's URI."""
        for i, image in enumerate(images):
            self.put(f"{prefix}img-{i:05d}.png", png_bytes(image))
        return self.uri(prefix)

    def keys(self, prefix: str) -> set[str]:
        """Every key under `prefix`, relative to it."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", ())}

    def tiny_clip(self) -> dict[str, str]:
        """The tiny CLIP's config and weights in the bucket, as a request's `model`."""
        return {
            "config": self.put(f"{MODEL_PREFIX}config.json", CONFIG_PATH.read_bytes()),
            "checkpoint": self.put(f"{MODEL_PREFIX}tiny_clip.safetensors", CHECKPOINT_PATH.read_bytes()),
        }

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] = lambda job: job["status"] in TERMINAL,
        timeout: float = 300.0,
    ) -> dict[str, Any]:
        """Poll GET /adaptations/{id} until `until(job)` holds; fail with worker logs on timeout."""
        deadline = time.monotonic() + timeout
        with self.control() as http:
            while True:
                job = http.get(f"/adaptations/{job_id}").raise_for_status().json()
                if until(job):
                    return job
                if time.monotonic() > deadline:
                    logs = "\n".join(w.log_tail(3000) for w in self.platform.workers())
                    raise AssertionError(f"job {job_id} is {job['status']} after {timeout:.0f} s:\n{logs}")
                time.sleep(0.5)


def _flushed_redis() -> None:
    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


@contextmanager
def running_stack(
    *, db_url: str, s3_endpoint: str, s3: Any, log_dir: Path, work_dir: Path
) -> Iterator[Stack]:
    """Migrate the database, then run the three processes until the block ends."""
    upgrade(db_url)
    _flushed_redis()
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    env = {
        "MUST_ENVIRONMENT": "development",
        "MUST_API_KEYS": API_KEY,
        "MUST_DATABASE__URL": db_url,
        "MUST_BROKER__URL": BROKER_URL,
        "MUST_STORAGE__ARTIFACTS_URI": f"s3://{bucket}/artifacts",
        "MUST_STORAGE__S3_ENDPOINT_URL": s3_endpoint,
        # The worker's image cache and local checkpoints, and the inference download cache.
        "TMPDIR": str(work_dir),
        **WORKER_ENV,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    with Platform(env=env, log_dir=log_dir) as platform:
        yield Stack(platform=platform, s3=s3, bucket=bucket)
    _flushed_redis()
