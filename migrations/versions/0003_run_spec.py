"""each run stores its resolved RunSpec (run.spec) and the spec's identity hash (run.spec_hash)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from worker.engine.config import RunSpec

    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spec", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("spec_hash", sa.String(length=64), nullable=True))
    # Runs from before: their spec is what the worker used to assemble at claim time, from the submission's
    # config and the competition's fixed parts.
    run = sa.table("run", sa.column("id", sa.Integer), sa.column("submission_id", sa.Integer),
                   sa.column("seed", sa.Integer), sa.column("spec", sa.JSON), sa.column("spec_hash", sa.String))
    sub = sa.table("submission", sa.column("id", sa.Integer), sa.column("competition_id", sa.Integer),
                   sa.column("config", sa.JSON))
    comp = sa.table("competition", sa.column("id", sa.Integer), sa.column("dataset", sa.JSON),
                    sa.column("model", sa.JSON), sa.column("budget", sa.JSON),
                    sa.column("deterministic", sa.Boolean))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(run.c.id, run.c.seed, sub.c.config, comp.c.dataset, comp.c.model, comp.c.budget,
                  comp.c.deterministic)
        .select_from(run.join(sub, sub.c.id == run.c.submission_id).join(comp, comp.c.id == sub.c.competition_id))
    ).all()
    for run_id, seed, config, dataset, model, budget, deterministic in rows:
        spec = RunSpec.model_validate({"config": config, "data": dataset, "model": model, "budget": budget,
                                       "seed": seed, "deterministic": bool(deterministic)})
        conn.execute(run.update().where(run.c.id == run_id).values(spec=spec.model_dump(mode="json"),
                                                                     spec_hash=spec.identity()))
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.alter_column("spec", existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column("spec_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index(batch_op.f("ix_run_spec_hash"), ["spec_hash"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_spec_hash"))
        batch_op.drop_column("spec_hash")
        batch_op.drop_column("spec")
