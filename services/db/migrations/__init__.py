"""Alembic migration environment of the job database."""
