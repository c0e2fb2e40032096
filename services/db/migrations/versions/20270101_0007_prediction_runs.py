"""Batch prediction runs (`POST /predictions`): an adaptation classifying every image under a prefix.

Revision ID: 0007_prediction_runs
Revises: 0006_names_tags
Create Date: 2027-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_prediction_runs"
down_revision: str | Sequence[str] | None = "0006_names_tags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "prediction_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*_STATUSES, name="jobstatus", native_enum=False, length=16, create_constraint=False),
            nullable=False,
        ),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("celery_task_id", sa.String(255), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("images_done", sa.Integer(), nullable=False),
        sa.Column("images_failed", sa.Integer(), nullable=False),
        sa.Column("images_abstained", sa.Integer(), nullable=False),
        sa.Column("results_key", sa.Text(), nullable=True),
        sa.Column("results_sha256", sa.String(64), nullable=True),
        sa.Column("results_bytes", sa.BigInteger(), nullable=True),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
    )
    op.create_index("ix_prediction_runs_tenant_created_at", "prediction_runs", ["tenant", "created_at"])
    op.create_index("ix_prediction_runs_job_id", "prediction_runs", ["job_id"])
    op.create_index(
        "ix_prediction_runs_status_lease_expires_at", "prediction_runs", ["status", "lease_expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_prediction_runs_status_lease_expires_at", table_name="prediction_runs")
    op.drop_index("ix_prediction_runs_job_id", table_name="prediction_runs")
    op.drop_index("ix_prediction_runs_tenant_created_at", table_name="prediction_runs")
    op.drop_table("prediction_runs")
