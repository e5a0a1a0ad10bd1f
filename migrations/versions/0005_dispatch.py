"""dispatch by the database: the deployment's identity (stamped on every broker message), a worker's
refusal reason on the fleet table, and the rate-limit counters

Revision ID: 0005
Revises: 0004
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    deployment = op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
    )
    # One row, made here: every database gets its own identity, the same for all its APIs and workers.
    op.bulk_insert(deployment, [{"id": 1, "uid": str(uuid.uuid4()), "created_at": datetime.now(UTC)}])
    op.create_table(
        "rate_window",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window", name=op.f("pk_rate_window")),
    )
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.add_column(sa.Column("problem", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.drop_column("problem")
    op.drop_table("rate_window")
    op.drop_table("deployment")
