"""The real stack on loopback for the fault bench: what `.ci/run` provides plus servers of its own.

PostgreSQL (a fresh database on the server `.ci/run` starts), a private redis-server that the
bench may restart without persistence, moto's S3 server behind a TCP proxy that the bench may
take down, the control API and the inference service under uvicorn, and two Celery workers:
all the platform's own processes started by `services.launcher.Platform`, in the development
environment (API keys required), with keys of two tenants and an admin key.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psycopg
from sqlalchemy.engine import make_url

from bench.loopback import RedisServer, moto_s3
from bench.outage import TcpProxy
from bench.shapes import iter_domain, png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import StorageSettings
from services.db.migrate import upgrade
from services.launcher import Platform
from services.storage.s3 import make_s3_client

PG_ADMIN_URL = os.environ.get("MUST_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TENANTS = ("alpha", "beta")
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Stack:
    """A running platform and what a client of it holds: URLs, keys, the bucket."""

    platform: Platform
    redis: RedisServer
    proxy: TcpProxy
    s3: Any
    bucket: str
    keys: dict[str, str]
    admin_key: str
    db_url: str
    root: Path

    def headers(self, who: str) -> dict[str, str]:
        key = self.admin_key if who == "admin" else self.keys[who]
        return {"Authorization": f"Bearer {key}"}

    def control(self, who: str = "alpha") -> httpx.Client:
        return httpx.Client(base_url=self.platform.control_url, headers=self.headers(who), timeout=60)

    def inference(self, who: str = "alpha") -> httpx.Client:
        return httpx.Client(base_url=self.platform.inference_url, headers=self.headers(who), timeout=120)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def put_images(self, prefix: str, count: int, seed: int) -> str:
        for i, (image, _) in enumerate(iter_domain("target", count, seed=seed)):
            self.put(f"{prefix}img-{i:05d}.png", png_bytes(image))
        return self.uri(prefix)

    def tiny_clip(self) -> dict[str, str]:
        return {
            "config": self.put("models/tiny-clip/config.json", CONFIG_PATH.read_bytes()),
            "checkpoint": self.put("models/tiny-clip/tiny_clip.safetensors", CHECKPOINT_PATH.read_bytes()),
        }


@contextmanager
def _pg_database() -> Iterator[str]:
    name = f"must_faults_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def platform_env(
    db_url: str,
    broker_url: str,
    bucket: str,
    endpoint: str,
    keys: dict[str, str],
    admin: str,
    root: Path,
    storage_retry_seconds: float,
) -> dict[str, str]:
    """The settings every process of the bench's platform runs with."""
    return {
        "MUST_ENVIRONMENT": "development",
        "MUST_API_KEYS": ",".join(f"{tenant}:{key}" for tenant, key in keys.items()),
        "MUST_ADMIN_API_KEYS": admin,
        "MUST_DATABASE__URL": db_url,
        "MUST_BROKER__URL": broker_url,
        "MUST_STORAGE__ARTIFACTS_URI": f"s3://{bucket}/platform",
        "MUST_STORAGE__S3_ENDPOINT_URL": endpoint,
        # Short leases and scans, so a killed worker's job and a lost message come back in seconds.
        "MUST_WORKER__HEARTBEAT_SECONDS": "1",
        "MUST_WORKER__LEASE_SECONDS": "4",
        "MUST_WORKER__RECONCILE_EVERY_SECONDS": "1",
        "MUST_WORKER__PROGRESS_EVERY_SECONDS": "0.5",
        "MUST_WORKER__REQUEUE_QUEUED_AFTER_SECONDS": "8",
        "MUST_WORKER__STORAGE_RETRY_SECONDS": str(storage_retry_seconds),
        "MUST_WORKER__MAX_STORAGE_REQUEUES": "5",
        "MUST_METRICS__WORKER_PORT": "0",
        "TMPDIR": str(root / "work"),
    }


@contextmanager
def running_stack(root: Path, *, workers: int = 2, storage_retry_seconds: float = 20) -> Iterator[Stack]:
    """Start everything; stop it all (and drop the database) when the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "work").mkdir(exist_ok=True)
    keys = {tenant: f"{tenant}-{secrets.token_hex(16)}" for tenant in TENANTS}
    admin = f"admin-{secrets.token_hex(16)}"
    with ExitStack() as stack:
        db_url = stack.enter_context(_pg_database())
        upgrade(db_url)
        redis = stack.enter_context(RedisServer(root / "redis.log"))
        endpoint = stack.enter_context(moto_s3(root / "moto.log"))
        proxy = TcpProxy(target_port=int(urlparse(endpoint).port or 0)).up()
        stack.callback(proxy.down)
        s3 = make_s3_client(StorageSettings(artifacts_uri="s3://must-artifacts", s3_endpoint_url=endpoint))
        bucket = f"faults-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        env = platform_env(db_url, redis.url, bucket, proxy.url, keys, admin, root, storage_retry_seconds)
        platform = Platform(env=env, log_dir=root / "logs", ready_timeout=240)
        stack.callback(platform.stop)
        platform.start_control_api()
        platform.start_inference()
        for _ in range(workers):
            platform.start_worker()
        yield Stack(platform, redis, proxy, s3, bucket, keys, admin, db_url, root)
