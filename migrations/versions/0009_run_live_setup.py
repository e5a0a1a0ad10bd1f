"""a run's precision and setup seconds on its row, written when the engine reports its setup, so that a
running run shows them before its result exists

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("precision", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("setup_seconds", sa.Float(), nullable=True))
    # The runs that are over, from the result records that already hold both.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE run SET precision = json_extract(result, '$.precision'), "
                   "setup_seconds = CAST(json_extract(result, '$.timings.setup_seconds') AS FLOAT) "
                   "WHERE result IS NOT NULL")
    else:
        op.execute("UPDATE run SET precision = result->>'precision', "
                   "setup_seconds = (result->'timings'->>'setup_seconds')::float WHERE result IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        for c in ("setup_seconds", "precision"):
            batch_op.drop_column(c)
