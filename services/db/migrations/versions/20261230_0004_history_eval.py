"""Phase history, worker log lines and eval-set scores of jobs.

- `job_phases`: each phase a job went through, with its start and end time.
- `job_logs`: the worker's log lines for a job (`GET /adaptations/{id}/logs`).
- `jobs.evaluation`: the scores on the labelled eval set the request named, if any.

Revision ID: 0004_history_eval
Revises: 0003_tenants
Create Date: 2026-12-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_history_eval"
down_revision: str | Sequence[str] | None = "0003_tenants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the phase values at this revision (stored as VARCHAR, no CHECK constraint).
_PHASES = (
    "queued",
    "listing",
    "staging",
    "scoring_zero_shot",
    "training",
    "exporting",
    "evaluating",
    "done",
)
# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE"
    )


def upgrade() -> None:
    """Add the two history tables and the evaluation column."""
    op.create_table(
        "job_phases",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("phase", sa.Enum(*_PHASES, name="jobphase", native_enum=False, length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        _job_fk("job_phases"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_phases")),
    )
    op.create_index("ix_job_phases_job_id_started_at", "job_phases", ["job_id", "started_at"])
    op.create_table(
        "job_logs",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("logger", sa.String(255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _job_fk("job_logs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_logs")),
    )
    op.create_index("ix_job_logs_job_id_id", "job_logs", ["job_id", "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("evaluation")
    op.drop_index("ix_job_logs_job_id_id", table_name="job_logs")
    op.drop_table("job_logs")
    op.drop_index("ix_job_phases_job_id_started_at", table_name="job_phases")
    op.drop_table("job_phases")
