"""Process settings: one pydantic-settings class read from `MUST_*` environment variables.

Nested fields use `__`, e.g. `MUST_DATABASE__URL`, `MUST_STORAGE__S3_ENDPOINT_URL`.
https://docs.pydantic.dev/latest/concepts/pydantic_settings/#parsing-environment-variable-values
"""

from __future__ import annotations

import json
import os
import re
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

# A tenant (project) name: lower-case letters, digits, `_`, `.` and `-`, as in `acme` or `team-a`.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_TENANT_RE = re.compile(TENANT_PATTERN)
# The tenant of an env-var key given without one (`MUST_API_KEYS=KEY`), and of the embedded mode.
DEFAULT_TENANT = "default"
# The tenant recorded on jobs that an admin key (MUST_ADMIN_API_KEYS) submits.
ADMIN_TENANT = "admin"
# The placeholder every secret in .env.example starts with; production refuses to start with one.
PLACEHOLDER_SECRET = "change-me"


def split_env_key(entry: str) -> tuple[str, str]:
    """`(tenant, key)` of one MUST_API_KEYS entry: `KEY` (the default tenant) or `TENANT:KEY`."""
    tenant, sep, key = entry.partition(":")
    if not sep:
        return DEFAULT_TENANT, entry
    if not _TENANT_RE.match(tenant) or not key:
        raise ValueError(
            "an api_keys entry is KEY or TENANT:KEY, with TENANT made of a-z, 0-9, '_', '.', '-' "
            "(at most 64) and a non-empty KEY"
        )
    return tenant, key


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
    # The S3 address clients reach, used only to sign download URLs (GET /adaptations/{id}/artifact)
    # when the services reach the store at an internal one (compose: http://minio:9000); None: the same.
    s3_public_endpoint_url: str | None = None
    # How long a download URL of a classifier stays valid.
    download_url_seconds: int = Field(default=3600, gt=0, le=7 * 24 * 3600)

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
    # Largest request body the control API reads (JSON); 10,000 class names of 256 characters fit.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # Largest request body the inference service reads (all uploaded files of one POST /predict).
    max_upload_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    # Files in one POST /predict.
    max_files_per_request: int = Field(default=64, gt=0)
    # Pixels of all images of one /predict request together, counted from their headers before any
    # is decoded: 16 PNGs of 7000x7000 are 784 million pixels and 2.3 GB once decoded.
    max_request_pixels: int = Field(default=100_000_000, gt=0)
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
    # A job still queued this long after its message was sent, whose message is no longer in the
    # broker (a Redis restart without persistence loses it), is sent again by the reconciler.
    requeue_queued_after_seconds: float = Field(default=300, gt=0)
    # Checkpoints kept in the artifacts store per job (older ones are deleted after each new one).
    keep_checkpoints: int = Field(default=3, ge=1)
    # Days after a job finishes when the workers' reconciler deletes its checkpoints (the classifier,
    # manifest and metrics stay); None keeps them until the job is deleted.
    checkpoint_retention_days: float | None = Field(default=None, gt=0)
    # How long one storage operation of a running job is retried (with backoff) before giving up.
    storage_retry_seconds: float = Field(default=30, ge=0)
    # A job that still cannot reach the store goes back to the queue, to resume from its last
    # checkpoint, at most this many times; then it fails.
    max_storage_requeues: int = Field(default=3, ge=0)
    # GPUs this worker may give one job: it consumes the queues `gpu`, `gpu.2` .. `gpu.<gpus>` and
    # never takes a job asking for more. None counts the CUDA devices it sees (0 on a CPU machine,
    # which then serves `gpu` only). Set it to use fewer than all, or to run N gloo ranks on the CPU.
    gpus: int | None = Field(default=None, ge=0, le=16)
    # Times the worker starts a multi-GPU job's processes again (a new torchrun) after one of them
    # died; they resume from the job's last checkpoint. Past that the job fails.
    rank_restarts: int = Field(default=1, ge=0)

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


class ModelSettings(BaseModel):
    """Where CLIP weights may come from."""

    # Whether a `pretrained` tag may be downloaded from open_clip's hub (Hugging Face) or URL.
    # Off: only weights already in the local model cache are used, and no request makes a service
    # contact any host but the S3 endpoint; upload the weights and pass an s3:// checkpoint instead.
    allow_downloads: bool = False
    # Seconds a weights download may go without progress (connect, each read) before it fails.
    download_timeout_seconds: float = Field(default=20, gt=0)
    # Folders on the servers whose files requests may name as model.checkpoint / model.config
    # outside the embedded mode (absolute paths); empty: only s3:// URIs.
    local_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    @field_validator("local_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("local_dirs")
    @classmethod
    def _absolute_dirs(cls, folders: list[Path]) -> list[Path]:
        relative = [str(folder) for folder in folders if not folder.is_absolute()]
        if relative:
            raise ValueError(f"models.local_dirs must be absolute paths, got {relative}")
        return [folder.resolve() for folder in folders]


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
    models: ModelSettings = Field(default_factory=ModelSettings)
    # Worker log lines: one JSON object per line (with the job id), or plain text for a terminal.
    log_format: Literal["json", "text"] = "json"
    # Keys accepted by both HTTP services (Authorization: Bearer or X-API-Key), each `KEY` (tenant
    # `default`) or `TENANT:KEY`; a key sees only its tenant's jobs. Keys stored in the database
    # (`must-keys create`) work beside these. NoDecode lets it be comma-separated as well as JSON.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # Keys that see and act on every tenant's jobs (operators, dashboards); same format as api_keys.
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # How long a service remembers a database key lookup: a revoked key stops working within this.
    api_key_cache_seconds: float = Field(default=5, ge=0)

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _tenant_prefixes(cls, keys: list[str]) -> list[str]:
        for entry in keys:
            split_env_key(entry)
        return keys

    def env_keys(self) -> list[tuple[str, str, bool]]:
        """Every env-var key as `(tenant, key, admin)`."""
        plain = [(*split_env_key(entry), False) for entry in self.api_keys]
        admin = [(ADMIN_TENANT, split_env_key(entry)[1], True) for entry in self.admin_api_keys]
        return plain + admin

    @model_validator(mode="after")
    def _keys_outside_embedded(self) -> Self:
        # Production reports a missing key among its other problems, below.
        if self.environment == "development" and not (self.api_keys or self.admin_api_keys):
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
        if not (self.api_keys or self.admin_api_keys):
            problems.append("api_keys is empty; set MUST_API_KEYS")
        problems += [f"{name} is still a {PLACEHOLDER_SECRET} placeholder" for name in self._placeholders()]
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self

    def _placeholders(self) -> list[str]:
        """Secrets left at .env.example's `change-me...` values (URL passwords included)."""
        candidates = {
            "api_keys": ",".join(self.api_keys),
            "admin_api_keys": ",".join(self.admin_api_keys),
            "database.url": self.database.url,
            "broker.url": self.broker.url,
            # Not a MUST_ setting, but the S3 secret the services run with (docker-compose passes
            # MINIO_ROOT_PASSWORD here), so a placeholder is refused with the others.
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        }
        return [name for name, value in candidates.items() if PLACEHOLDER_SECRET in value.lower()]


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; call at the process edge and pass values down."""
    return Settings()
