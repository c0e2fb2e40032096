"""Names and tags of jobs, to find them again (`GET /adaptations?name=&tag=`).

- `jobs.name`: an optional name given at submit time, with an index per tenant.
- `jobs.tags`: the job's tags as one string, `,a,b,` (sorted, each between commas), so a tag
  filter is the same portable `LIKE '%,tag,%'` on PostgreSQL and SQLite; tags cannot hold commas.

Revision ID: 0006_names_tags
Revises: 0003_tenants (0004/0005 are added in parallel; the chain is fixed when they merge)
Create Date: 2026-12-31
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_names_tags"
down_revision: str | Sequence[str] | None = "0004_history_eval"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("tags", sa.String(1400), nullable=True))
    op.create_index("ix_jobs_tenant_name", "jobs", ["tenant", "name"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_name", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("tags")
        batch.drop_column("name")
