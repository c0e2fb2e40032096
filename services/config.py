"""Process settings: one pydantic-settings class read from `MUST_*` environment variables.

Nested fields use `__`, e.g. `MUST_DATABASE__URL`, `MUST_STORAGE__S3_ENDPOINT_URL`.
https://docs.pydantic.dev/latest/concepts/pydantic_settings/#parsing-environment-variable-values
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.errors import InvalidRequest
from services.storage.uri import parse_uri

Environment = Literal["embedded", "development", "production"]

# Celery brokers that need no server; fine for one machine, unsafe for several workers.
_EMBEDDED_BROKER_PREFIXES = ("filesystem://", "sqla+sqlite", "memory://")


def _absolute_sqlite(url: str) -> str:
    """Rewrite `sqlite:///relative/path` to an absolute path; leave memory and absolute URLs alone."""
    prefix = "sqlite:///"
    path, sep, query = url.removeprefix(prefix).partition("?")
    if not url.startswith(prefix) or not path or path.startswith("/") or path == ":memory:":
        return url
    return f"{prefix}{Path(path).resolve()}{sep}{query}"


class DatabaseSettings(BaseModel):
    """Where jobs are recorded."""

    # SQLAlchemy URL; PostgreSQL must use the psycopg 3 driver: postgresql+psycopg://user:pw@host/db.
    # https://docs.sqlalchemy.org/en/20/dialects/postgresql.html#module-sqlalchemy.dialects.postgresql.psycopg
    # A relative SQLite path is made absolute at start, so a later chdir cannot switch databases.
    url: str = Field(default="sqlite:///./.must/must.db", validate_default=True)

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"database url must be sqlite:// or postgresql+psycopg://, got {url!r}")
        return _absolute_sqlite(url)


class BrokerSettings(BaseModel):
    """Where job ids are queued for workers."""

    # Any Celery broker URL. The default, `filesystem://`, needs no server (the embedded default,
    # one machine); deployments use redis://.
    # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/index.html
    url: str = "filesystem://"
    # With late acks, Redis hands a task that is still unacknowledged after this many seconds to
    # another worker (Celery's default is 1 h), so it must outlast the longest job.
    # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
    visibility_timeout_seconds: int = Field(default=24 * 3600, gt=0)
    # Message folder of the `filesystem://` broker; a relative path is made absolute at start.
    filesystem_folder: Path = Field(default=Path("./.must/broker"), validate_default=True)

    @field_validator("filesystem_folder")
    @classmethod
    def _absolute_folder(cls, folder: Path) -> Path:
        return folder.resolve()


class StorageSettings(BaseModel):
    """Where checkpoints and adapted classifiers are stored; S3 credentials come from boto3's chain."""

    # s3://bucket/prefix or file:///abs/path; a relative file:// path is made absolute at start.
    artifacts_uri: str = Field(default="file://./.must/store", validate_default=True)
    # Set for MinIO or another S3-compatible server; None means AWS S3 itself.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    @field_validator("artifacts_uri")
    @classmethod
    def _parse_and_resolve(cls, uri: str) -> str:
        try:
            return str(parse_uri(uri))
        except InvalidRequest as exc:
            raise ValueError(exc.message) from exc


class LimitsSettings(BaseModel):
    """Guards against oversized inputs."""

    max_object_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # Same role as PIL.Image.MAX_IMAGE_PIXELS: refuse decompression bombs before decoding.
    # https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.open
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    # S3 ListObjectsV2 returns at most 1000 keys per page anyway.
    # https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html
    list_page_size: int = Field(default=1000, gt=0, le=1000)


class WorkerSettings(BaseModel):
    """Timing of the worker's lease, checkpoints and progress reports."""

    heartbeat_seconds: float = Field(default=10, gt=0)
    # A job whose lease is older than this is considered abandoned and may be taken over.
    lease_seconds: float = Field(default=60, gt=0)
    checkpoint_every: int = Field(default=200, gt=0)
    progress_every_seconds: float = Field(default=3, gt=0)
    # How often each worker looks for running jobs whose lease expired (their worker died).
    reconcile_every_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Self:
        if self.lease_seconds <= self.heartbeat_seconds:
            raise ValueError("worker.lease_seconds must be longer than worker.heartbeat_seconds")
        return self


class MetricsSettings(BaseModel):
    """Prometheus metrics of the worker (the HTTP services serve theirs at `/metrics`)."""

    # Port of the worker's metrics endpoint (prometheus_client's HTTP server, in the process that
    # runs jobs); 0 turns it off. 9808 is unassigned in Prometheus' default port allocations.
    # https://github.com/prometheus/prometheus/wiki/Default-port-allocations
    worker_port: int = Field(default=9808, ge=0, le=65535)
    worker_host: str = "0.0.0.0"


class Settings(BaseSettings):
    """Every setting of the platform's processes, validated at start."""

    # env_ignore_empty: an empty MUST_* variable means "not set" (docker-compose passes `${VAR:-}` as "").
    model_config = SettingsConfigDict(
        env_prefix="MUST_", env_nested_delimiter="__", extra="ignore", env_ignore_empty=True
    )

    environment: Environment = "embedded"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # Worker log lines: one JSON object per line (with the job id), or plain text for a terminal.
    log_format: Literal["json", "text"] = "json"
    # Keys accepted by both HTTP services (Authorization: Bearer or X-API-Key); required outside
    # the embedded environment. NoDecode lets MUST_API_KEYS be comma-separated as well as JSON.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _keys_outside_embedded(self) -> Self:
        # Production reports a missing key among its other problems, below.
        if self.environment == "development" and not self.api_keys:
            raise ValueError(
                "api_keys is empty; set MUST_API_KEYS (the services require API keys outside "
                "the embedded environment)"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.environment != "production":
            return self
        problems = []
        if self.database.url.startswith("sqlite"):
            problems.append("database.url is SQLite; use postgresql+psycopg://")
        if self.broker.url.startswith(_EMBEDDED_BROKER_PREFIXES):
            problems.append("broker.url is a serverless broker; use redis://")
        if not self.api_keys:
            problems.append("api_keys is empty; set MUST_API_KEYS")
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; call at the process edge and pass values down."""
    return Settings()
