"""Settings: MUST_ environment parsing, defaults and the production refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import Settings, get_settings

PROD_ENV = {
    "MUST_ENVIRONMENT": "production",
    "MUST_DATABASE__URL": "postgresql+psycopg://must:pw@db:5432/must",
    "MUST_BROKER__URL": "redis://redis:6379/0",
    "MUST_API_KEYS": "key-1",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run each test without inherited MUST_ variables, from an empty working folder."""
    for name in list(os.environ):
        if name.startswith("MUST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()


def test_embedded_defaults_are_absolute(tmp_path: Path) -> None:
    settings = Settings()
    assert settings.environment == "embedded"
    assert settings.database.url == f"sqlite:///{tmp_path.resolve()}/.must/must.db"
    assert settings.storage.artifacts_uri == (tmp_path.resolve() / ".must" / "store").as_uri()
    assert settings.broker.url == "filesystem://"
    assert settings.broker.filesystem_folder == tmp_path.resolve() / ".must" / "broker"
    assert settings.limits.list_page_size == 1000
    assert settings.worker.lease_seconds > settings.worker.heartbeat_seconds
    assert settings.api_keys == []


def test_nested_env_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUST_DATABASE__URL", "postgresql+psycopg://u:p@h:5432/d")
    monkeypatch.setenv("MUST_BROKER__URL", "redis://redis:6379/0")
    monkeypatch.setenv("MUST_STORAGE__ARTIFACTS_URI", "s3://must-artifacts/prod")
    monkeypatch.setenv("MUST_STORAGE__S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("MUST_LIMITS__MAX_OBJECT_BYTES", "1024")
    monkeypatch.setenv("MUST_WORKER__CHECKPOINT_EVERY", "50")
    settings = Settings()
    assert settings.database.url == "postgresql+psycopg://u:p@h:5432/d"
    assert settings.broker.url == "redis://redis:6379/0"
    assert settings.storage.artifacts_uri == "s3://must-artifacts/prod"
    assert settings.storage.s3_endpoint_url == "http://minio:9000"
    assert settings.limits.max_object_bytes == 1024
    assert settings.worker.checkpoint_every == 50


@pytest.mark.parametrize("raw", ["sk-one, sk-two", '["sk-one", "sk-two"]'])
def test_api_keys_comma_or_json(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("MUST_API_KEYS", raw)
    settings = Settings()
    assert settings.api_keys == ["sk-one", "sk-two"]
    assert "sk-one" not in repr(settings)


def test_valid_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PROD_ENV.items():
        monkeypatch.setenv(name, value)
    assert Settings().environment == "production"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MUST_DATABASE__URL", "sqlite:///x.db", "database.url is SQLite"),
        ("MUST_API_KEYS", "", "api_keys is empty"),
        ("MUST_BROKER__URL", "filesystem://", "serverless broker"),
    ],
)
def test_production_refuses_unsafe(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    for key, default in PROD_ENV.items():
        monkeypatch.setenv(key, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MUST_API_KEYS", "change-me-api-key", "api_keys is still a change-me placeholder"),
        ("MUST_ADMIN_API_KEYS", "ops:change-me-admin", "admin_api_keys is still a change-me placeholder"),
        (
            "MUST_DATABASE__URL",
            "postgresql+psycopg://must:change-me-postgres@postgres:5432/must",
            "database.url is still a change-me placeholder",
        ),
        (
            "MUST_BROKER__URL",
            "redis://:change-me-redis@redis:6379/0",
            "broker.url is still a change-me placeholder",
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            "change-me-minio",
            "AWS_SECRET_ACCESS_KEY is still a change-me placeholder",
        ),
    ],
)
def test_production_refuses_placeholder_secrets(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    for key, default in PROD_ENV.items():
        monkeypatch.setenv(key, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_placeholders_are_fine_outside_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUST_ENVIRONMENT", "development")
    monkeypatch.setenv("MUST_API_KEYS", "change-me-api-key")

    assert Settings().api_keys == ["change-me-api-key"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain-key", [("default", "plain-key", False)]),
        ("acme:k1, team-b:k2", [("acme", "k1", False), ("team-b", "k2", False)]),
    ],
)
def test_env_keys_carry_their_tenant(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[tuple[str, str, bool]]
) -> None:
    monkeypatch.setenv("MUST_API_KEYS", raw)
    monkeypatch.setenv("MUST_ADMIN_API_KEYS", "root-key")

    assert Settings().env_keys() == [*expected, ("admin", "root-key", True)]


def test_a_key_with_a_bad_tenant_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUST_API_KEYS", "Not A Tenant:key")
    with pytest.raises(ValidationError, match="TENANT:KEY"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MUST_STORAGE__ARTIFACTS_URI", "gs://bucket", "unsupported storage scheme"),
        ("MUST_DATABASE__URL", "mysql://x", "sqlite:// or postgresql"),
        ("MUST_WORKER__LEASE_SECONDS", "5", "lease_seconds must be longer"),
        ("MUST_ENVIRONMENT", "staging", "environment"),
        ("MUST_MODELS__LOCAL_DIRS", "models/", "must be absolute"),
    ],
)
def test_invalid_values_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("MUST_LIMITS__LIST_PAGE_SIZE", "10")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().limits.list_page_size == 10
