"""Alembic revisions of the job database."""
