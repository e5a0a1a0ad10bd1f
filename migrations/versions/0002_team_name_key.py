"""team names unique case-insensitively: team.name_key (case-folded NFKC) replaces (competition_id, name)

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from app.names import name_key

    with op.batch_alter_table("team", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name_key", sa.String(length=100), nullable=True))
    team = sa.table("team", sa.column("id", sa.Integer), sa.column("competition_id", sa.Integer),
                    sa.column("name", sa.String), sa.column("name_key", sa.String))
    conn = op.get_bind()
    taken: set[tuple[int, str]] = set()
    for team_id, comp_id, name in conn.execute(
            sa.select(team.c.id, team.c.competition_id, team.c.name).order_by(team.c.id)).all():
        try:
            key = name_key(name)
        except ValueError:  # a name from before names were checked
            key = name.casefold()
        if (comp_id, key) in taken:  # "Owls" and "owls" were two teams before: the later one keeps its id
            key = f"{key[:90]}#{team_id}"
        taken.add((comp_id, key))
        conn.execute(team.update().where(team.c.id == team_id).values(name_key=key))
    with op.batch_alter_table("team", schema=None) as batch_op:
        batch_op.alter_column("name_key", existing_type=sa.String(length=100), nullable=False)
        batch_op.drop_constraint("uq_team_competition_id", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_team_competition_id"), ["competition_id", "name_key"])


def downgrade() -> None:
    with op.batch_alter_table("team", schema=None) as batch_op:
        batch_op.drop_constraint("uq_team_competition_id", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_team_competition_id"), ["competition_id", "name"])
        batch_op.drop_column("name_key")
