"""Alembic environment: finds the database URL and runs the revisions online or offline."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from services.db import models  # noqa: F401 - registers the tables on Base.metadata for autogenerate
from services.db.base import Base
from services.db.session import make_engine, normalize_url

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    """`-x url=...`, then a programmatic `url` attribute, then sqlalchemy.url, then MUST_DATABASE__URL."""
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from services.config import Settings

        url = Settings().database.url
    return normalize_url(url).render_as_string(hide_password=False)


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    """Configure the context; SQLite needs batch mode because it cannot ALTER most things."""
    if connection is not None:
        backend = connection.dialect.name
    else:
        backend = normalize_url(url or "").get_backend_name()
    context.configure(
        connection=connection,
        url=url,
        target_metadata=Base.metadata,
        render_as_batch=backend == "sqlite",
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of connecting (`alembic upgrade head --sql`)."""
    _configure(url=_database_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database: a connection passed by the caller, or a fresh engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run_on(conn)
    finally:
        engine.dispose()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
