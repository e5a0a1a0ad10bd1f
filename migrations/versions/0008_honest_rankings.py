"""honest rankings: per-seed scores and calibration on runs and submissions, per-image correctness and the
test labels for rank bands and ensembles, the cached board, final entries, freeze, config reveal, baselines,
ensembles and rescores

Revision ID: 0008
Revises: 0007
"""

import statistics
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("competition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("freeze_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("final_entries", sa.Integer(), server_default="2", nullable=False))
        batch_op.add_column(sa.Column("reveal_configs", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("board_view", sa.String(length=20), server_default="accuracy",
                                      nullable=False))
    with op.batch_alter_table("submission", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=20), server_default="train", nullable=False))
        batch_op.add_column(sa.Column("members", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("is_baseline", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("final", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("final_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("round", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("accuracy_std", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("ece", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("private_accuracy", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("private_accuracy_std", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("private_ece", sa.Float(), nullable=True))
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("round", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("ece", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("private_ece", sa.Float(), nullable=True))
    with op.batch_alter_table("run_logits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("correct", sa.LargeBinary(), nullable=True))
    # The runs' ECE, from the result records that already hold it.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE run SET ece = CAST(json_extract(result, '$.metrics.public.ece') AS FLOAT), "
                   "private_ece = CAST(json_extract(result, '$.metrics.private.ece') AS FLOAT) "
                   "WHERE result IS NOT NULL")
    else:
        op.execute("UPDATE run SET ece = (result->'metrics'->'public'->>'ece')::float, "
                   "private_ece = (result->'metrics'->'private'->>'ece')::float WHERE result IS NOT NULL")
    _backfill_scores(op.get_bind())
    op.create_table(
        "test_labels",
        sa.Column("competition_id", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["competition_id"], ["competition.id"],
                                name=op.f("fk_test_labels_competition_id_competition"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("competition_id", name=op.f("pk_test_labels")),
    )
    op.create_table(
        "board_cache",
        sa.Column("competition_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("computed_version", sa.Integer(), nullable=True),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refreshing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stale_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["competition_id"], ["competition.id"],
                                name=op.f("fk_board_cache_competition_id_competition"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("competition_id", name=op.f("pk_board_cache")),
    )
    op.create_table(
        "rescore",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("competition_id", sa.Integer(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("seeds", sa.JSON(), nullable=False),
        sa.Column("submission_ids", sa.JSON(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["competition_id"], ["competition.id"],
                                name=op.f("fk_rescore_competition_id_competition"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["created_by_id"], ["user_account.id"],
                                name=op.f("fk_rescore_created_by_id_user_account")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rescore")),
        sa.UniqueConstraint("competition_id", "round", name=op.f("uq_rescore_competition_id")),
    )


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """As refresh_submission derives them: None when any value is missing; the sample std (None for one)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _backfill_scores(bind) -> None:
    """Succeeded submissions' std across seeds, mean ECE and private scores, from their runs (every run was
    round 0 before this revision), the way refresh_submission derives them from now on."""
    runs: dict[int, list] = {}
    for row in bind.execute(sa.text(
            "SELECT run.submission_id, run.accuracy, run.private_accuracy, run.ece, run.private_ece FROM run "
            "JOIN submission ON submission.id = run.submission_id WHERE submission.status = 'succeeded' "
            "ORDER BY run.submission_id, run.seed")):
        runs.setdefault(row[0], []).append(row[1:])
    update = sa.text("UPDATE submission SET accuracy_std = :std, ece = :ece, private_accuracy = :private, "
                     "private_accuracy_std = :private_std, private_ece = :private_ece WHERE id = :id")
    rows = []
    for submission_id, values in runs.items():
        acc, private, ece, private_ece = (list(column) for column in zip(*values, strict=True))
        rows.append({"id": submission_id, "std": _mean_std(acc)[1], "ece": _mean_std(ece)[0],
                     "private": _mean_std(private)[0], "private_std": _mean_std(private)[1],
                     "private_ece": _mean_std(private_ece)[0]})
    if rows:
        bind.execute(update, rows)


def downgrade() -> None:
    op.drop_table("rescore")
    op.drop_table("board_cache")
    op.drop_table("test_labels")
    with op.batch_alter_table("run_logits", schema=None) as batch_op:
        batch_op.drop_column("correct")
    with op.batch_alter_table("run", schema=None) as batch_op:
        for c in ("private_ece", "ece", "round"):
            batch_op.drop_column(c)
    with op.batch_alter_table("submission", schema=None) as batch_op:
        for c in ("private_ece", "private_accuracy_std", "private_accuracy", "ece", "accuracy_std", "round",
                  "final_at", "final", "is_baseline", "members", "kind"):
            batch_op.drop_column(c)
    with op.batch_alter_table("competition", schema=None) as batch_op:
        for c in ("board_view", "reveal_configs", "final_entries", "freeze_at"):
            batch_op.drop_column(c)
