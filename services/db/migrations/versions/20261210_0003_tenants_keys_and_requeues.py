"""Tenants and API keys; when a job was queued; requeues after storage outages.

- `api_keys`: keys stored as SHA-256, each belonging to a tenant, revocable.
- `jobs.tenant`: the owner of each job (existing jobs go to the `default` tenant, the tenant of
  an env-var key given without one); idempotency keys become unique per tenant.
- `jobs.enqueued_at`: when the job's queue message was last sent, so the reconciler can send
  again the message of a job that stays queued (a broker restart without persistence loses it).
- `jobs.storage_requeues`: how often the job went back to the queue because S3 was unreachable.

Revision ID: 0003_tenants
Revises: 0002
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_tenants"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _create_api_keys() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def upgrade() -> None:
    """Add the api_keys table and the new job columns; scope idempotency keys to tenants."""
    _create_api_keys()
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=False, server_default="default"))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("storage_requeues", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_jobs_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_jobs_tenant_idempotency_key", ["tenant", "idempotency_key"])
        batch.create_index("ix_jobs_tenant_created_at", ["tenant", "created_at"])
    # The server defaults only filled the existing rows; the application always sets both.
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("tenant", server_default=None)
        batch.alter_column("storage_requeues", server_default=None)


def downgrade() -> None:
    """Back to one global idempotency-key namespace (fails if two tenants share a key)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_created_at")
        batch.drop_constraint("uq_jobs_tenant_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
        batch.drop_column("storage_requeues")
        batch.drop_column("enqueued_at")
        batch.drop_column("tenant")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
