"""the leaderboard materialised: each team's best succeeded submission (team_best), backfilled from the
submissions already ranked; each team's submission count (team.submissions), backfilled by counting

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The board's order within each team (accuracy, then fewer GPU-seconds, then earlier, then lower id), as
# leaderboard.service ranked it before this table existed. Written out here, not imported, so that this
# revision does what it did on the day it was written. Window functions: SQLite >= 3.25 and PostgreSQL.
BACKFILL = """
INSERT INTO team_best (competition_id, team_id, submission_id, accuracy, gpu_seconds, submitted_at)
SELECT competition_id, team_id, id, accuracy, gpu_seconds, created_at
FROM (
    SELECT id, competition_id, team_id, accuracy, gpu_seconds, created_at,
           row_number() OVER (PARTITION BY team_id
                              ORDER BY accuracy DESC, gpu_seconds ASC, created_at ASC, id ASC) AS nth
    FROM submission
    WHERE status = 'succeeded'
) ranked
WHERE nth = 1
"""


# Every submission counts, whatever its status, as the board counted them before.
COUNT = "UPDATE team SET submissions = (SELECT count(*) FROM submission WHERE submission.team_id = team.id)"


def upgrade() -> None:
    op.create_table(
        "team_best",
        sa.Column("competition_id", sa.Integer(), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.Integer(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["competition_id"], ["competition.id"],
                                name=op.f("fk_team_best_competition_id_competition"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["submission_id"], ["submission.id"],
                                name=op.f("fk_team_best_submission_id_submission"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["team_id"], ["team.id"], name=op.f("fk_team_best_team_id_team"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("competition_id", "team_id", name=op.f("pk_team_best")),
        sa.UniqueConstraint("submission_id", name=op.f("uq_team_best_submission_id")),
    )
    op.execute(BACKFILL)
    with op.batch_alter_table("team", schema=None) as batch_op:
        batch_op.add_column(sa.Column("submissions", sa.Integer(), server_default="0", nullable=False))
    op.execute(COUNT)


def downgrade() -> None:
    with op.batch_alter_table("team", schema=None) as batch_op:
        batch_op.drop_column("submissions")
    op.drop_table("team_best")
