"""identical hardware and honest cost: hardware classes (seeded with the common ones) and measured
throughput; per-team GPU-hour budgets and running caps; runs' predicted and charged device-seconds,
failure kinds, dedup links and device-mismatch flags; a worker's class and thread share on the fleet table

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# name, device type, name pattern, memory GiB range, precision auto must give, CPU capability, prior
# images/s (train, eval) for a width-64 ResNet18 on 32-pixel images, description. Written out here, not
# imported, so this revision seeds what it seeded on the day it was written; admins edit them later.
# Memory ranges are torch's total_memory in GiB (an "80GB" H100 reports 79.2 GiB).
CLASSES = [
    ("cpu", "cpu", "", None, None, None, None, 25.0, 100.0, "Any x86-64 CPU (development and classrooms)."),
    ("cpu-avx2", "cpu", "", None, None, "fp32", "AVX2", 25.0, 100.0,
     "CPU running ATen's AVX2 kernels; precision auto is fp32."),
    ("cpu-avx512", "cpu", "", None, None, None, "AVX512", 40.0, 160.0, "CPU running ATen's AVX-512 kernels."),
    ("l4", "cuda", "L4", 20.0, 24.0, "bf16", None, 4000.0, 16000.0, "NVIDIA L4, 24 GB."),
    ("a100-40gb", "cuda", "A100", 36.0, 42.0, "bf16", None, 10000.0, 40000.0, "NVIDIA A100, 40 GB."),
    ("a100-80gb", "cuda", "A100", 75.0, 82.0, "bf16", None, 10000.0, 40000.0, "NVIDIA A100, 80 GB."),
    ("h100-80gb", "cuda", "H100", 75.0, 82.0, "bf16", None, 15000.0, 60000.0, "NVIDIA H100, 80 GB."),
    ("h200", "cuda", "H200", 130.0, 145.0, "bf16", None, 18000.0, 70000.0, "NVIDIA H200, 141 GB."),
]


def upgrade() -> None:
    classes = op.create_table(
        "hardware_class",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("device_type", sa.String(length=10), nullable=False),
        sa.Column("name_pattern", sa.String(length=200), nullable=False),
        sa.Column("min_memory_gib", sa.Float(), nullable=True),
        sa.Column("max_memory_gib", sa.Float(), nullable=True),
        sa.Column("precision", sa.String(length=10), nullable=True),
        sa.Column("cpu_capability", sa.String(length=20), nullable=True),
        sa.Column("train_images_per_sec", sa.Float(), nullable=False),
        sa.Column("eval_images_per_sec", sa.Float(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_hardware_class")),
    )
    now = datetime.now(UTC)
    op.bulk_insert(classes, [
        {"name": n, "device_type": t, "name_pattern": p, "min_memory_gib": lo, "max_memory_gib": hi,
         "precision": prec, "cpu_capability": isa, "train_images_per_sec": tr, "eval_images_per_sec": ev,
         "description": d, "updated_at": now}
        for n, t, p, lo, hi, prec, isa, tr, ev, d in CLASSES])
    op.create_table(
        "throughput",
        sa.Column("hardware_class", sa.String(length=50), nullable=False),
        sa.Column("model_key", sa.String(length=100), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=False),
        sa.Column("train_images_per_sec", sa.Float(), nullable=False),
        sa.Column("eval_images_per_sec", sa.Float(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hardware_class", "model_key", "image_size", name=op.f("pk_throughput")),
    )
    with op.batch_alter_table("competition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu_hour_budget", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("max_running_per_team", sa.Integer(), nullable=True))
    with op.batch_alter_table("submission", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_kind", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("predicted_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("charged_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("device_mismatch", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure_kind", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("predicted_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("charged_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reused_from_run_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("device_mismatch", sa.Text(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_run_reused_from_run_id_run"), "run", ["reused_from_run_id"], ["id"],
                                    ondelete="SET NULL")
    # Runs that already ended were charged what they measured (nothing was refunded before this revision).
    op.execute("UPDATE run SET charged_seconds = COALESCE(gpu_seconds, 0) "
               "WHERE status IN ('succeeded', 'failed', 'diverged', 'cancelled')")
    op.execute("UPDATE submission SET charged_seconds = (SELECT sum(charged_seconds) FROM run "
               "WHERE run.submission_id = submission.id)")
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hardware_class", sa.String(length=50), nullable=True))
        batch_op.add_column(sa.Column("threads", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_node", schema=None) as batch_op:
        batch_op.drop_column("threads")
        batch_op.drop_column("hardware_class")
    with op.batch_alter_table("run", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_run_reused_from_run_id_run"), type_="foreignkey")
        for c in ("device_mismatch", "reused_from_run_id", "charged_seconds", "predicted_seconds", "failure_kind"):
            batch_op.drop_column(c)
    with op.batch_alter_table("submission", schema=None) as batch_op:
        for c in ("device_mismatch", "charged_seconds", "predicted_seconds", "failure_kind"):
            batch_op.drop_column(c)
    with op.batch_alter_table("competition", schema=None) as batch_op:
        batch_op.drop_column("max_running_per_team")
        batch_op.drop_column("gpu_hour_budget")
    op.drop_table("throughput")
    op.drop_table("hardware_class")
