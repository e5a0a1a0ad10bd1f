"""Submissions and their runs. One submission is trained once per evaluation seed: k seeds, k runs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, PydanticJSON, TimestampMixin, UTCDateTime, utcnow
from worker.engine.config import RunSpec


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    diverged = "diverged"
    cancelled = "cancelled"


class SubmissionKind(StrEnum):
    train = "train"
    ensemble = "ensemble"


class FailureKind(StrEnum):
    """Why a failed (or diverged) run failed, which decides who pays for it (app.submissions.runs)."""

    infrastructure = "infrastructure"  # worker lost, node fault, services unreachable, process killed: refunded
    config = "config"  # diverged, out of memory at micro-batch 1, invalid at run time: charged
    timeout = "timeout"  # ran past its time limit (predicted time x factor): charged


TERMINAL = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.diverged, RunStatus.cancelled})
# The state machine: queued -> running -> terminal; queued -> cancelled; queued -> succeeded for a run that
# reuses an identical earlier run's result (app.submissions.dedup), at its submission; a dead worker's running
# run may be re-claimed (running -> running, with attempts + 1), swept back (running -> queued), or given up
# (-> failed).
TRANSITIONS: dict[str, frozenset[str]] = {
    RunStatus.queued: frozenset({RunStatus.running, RunStatus.cancelled, RunStatus.failed, RunStatus.succeeded}),
    RunStatus.running: frozenset({RunStatus.running, RunStatus.queued} | TERMINAL),
    **{s: frozenset() for s in TERMINAL},
}


class Submission(TimestampMixin, Base):
    __tablename__ = "submission"
    __table_args__ = (Index("ix_submission_competition_status", "competition_id", "status"),
                      UniqueConstraint("user_id", "idempotency_key"))

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"))
    team_id: Mapped[int] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    # The participant's config as resolved at submission (every default filled in): each run's spec.config
    # is this same config, kept here too because it is what the submission is (listed without its runs).
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The client's Idempotency-Key header: a retried POST with the same key gets this submission back.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Derived from the runs by submissions.service.refresh_submission; cached here so SQL can rank it.
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.queued)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)  # mean public accuracy over seeds
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # summed over seeds
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Derived from the runs too (refresh_submission): the first failed run's kind; the device-seconds
    # predicted at submission and those charged to the team; whether any run ran off its class's device.
    failure_kind: Mapped[str | None] = mapped_column(String(20), nullable=True)
    predicted_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    charged_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_mismatch: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # "train" (its runs train), or "ensemble": scored from its members' stored logits, no training
    # (app.submissions.ensembles); `members` holds the member submission ids, in the order given.
    kind: Mapped[str] = mapped_column(String(20), default=SubmissionKind.train, server_default="train")
    members: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    # An organizer's reference entry: shown on both boards as a marked line, takes no rank, not in team_best.
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Marked final by its team before the deadline (the private board ranks each team's best final entry).
    final: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    final_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The scoring round its scores come from: 0, or the round of the last rescore whose runs all succeeded
    # (app.submissions.rescore). Runs of other rounds are kept, and not counted.
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Over the scoring round's runs (one per seed), derived by refresh_submission like accuracy: the sample
    # std across seeds (null with one seed), the mean public ECE; and the private half's, which no
    # participant sees before the competition closes.
    accuracy_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    ece: Mapped[float | None] = mapped_column(Float, nullable=True)
    private_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    private_accuracy_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    private_ece: Mapped[float | None] = mapped_column(Float, nullable=True)

    runs: Mapped[list[Run]] = relationship(back_populates="submission", order_by="Run.id", lazy="selectin")


class Run(TimestampMixin, Base):
    __tablename__ = "run"
    __table_args__ = (UniqueConstraint("submission_id", "seed"), Index("ix_run_status", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submission.id", ondelete="CASCADE"), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    # Everything this run computes from, resolved once at submission (config with every default filled in,
    # the competition's data, model and budget, this run's seed). The worker reads this and nothing else.
    spec: Mapped[RunSpec] = mapped_column(PydanticJSON(RunSpec))
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)  # RunSpec.identity(): equal hash, equal run
    queue: Mapped[str] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.queued)
    # Bumped by every claim; updates carry it as a fencing token so a presumed-dead worker can't write.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker_hostname: Mapped[str | None] = mapped_column(String(255), nullable=True)
    device_name: Mapped[str | None] = mapped_column(String(255), nullable=True)  # set at claim; result.device
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1 of the epoch budget
    # The engine's TrainResult (worker.engine.result) is the record, stored whole in `result`. The columns
    # from here to `diverged_step` are its indexed copies, written from it by worker.tasks.result_columns
    # in the same UPDATE, so SQL can rank, sum and filter without parsing JSON. gpu_seconds is the result's
    # device_seconds; wall_seconds is the worker's own clock (claim to finish), not in the result.
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)  # public test half
    private_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    diverged_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    diverged_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    failure_kind: Mapped[str | None] = mapped_column(String(20), nullable=True)  # FailureKind, when failed
    # The scoring round it belongs to: 0 for the submission's own runs, r for those rescore r added.
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Expected calibration error (result.metrics.<half>.ece), indexed copies like accuracy.
    ece: Mapped[float | None] = mapped_column(Float, nullable=True)
    private_ece: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The engine's setup report (SetupEvent) for the current attempt, written before the first step so that a
    # running run shows them: the precision it trains in (bf16, fp16, fp32) and the seconds spent building
    # the model and moving data to the device. Cleared by each claim; once over, the result's precision and
    # timings.setup_seconds (worker.tasks.result_columns).
    precision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    setup_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Device-seconds predicted at submission (app.costs.predict) and the time limits derived from them.
    predicted_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the run cost its team (device-seconds): its gpu_seconds when it trained, 0 when refunded
    # (an infrastructure failure) or reused; None while it is not over.
    charged_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Set when the run's result was reused from an identical earlier run (dedup): that run's id.
    reused_from_run_id: Mapped[int | None] = mapped_column(ForeignKey("run.id", ondelete="SET NULL"),
                                                           nullable=True)
    # Why the device it ran on does not match its competition's hardware class (None: it matches).
    device_mismatch: Mapped[str | None] = mapped_column(Text, nullable=True)
    # TrainResult.to_json(): resolved spec, versions, device, timings, per-half metrics. Read it typed with
    # TrainResult.model_validate.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    submission: Mapped[Submission] = relationship(back_populates="runs", foreign_keys=[submission_id])


class EpochMetric(Base):
    """One row per epoch, written while the run trains (the live curve); the finished run's result.history
    holds the same rows as the engine's record."""

    __tablename__ = "epoch_metric"
    __table_args__ = (UniqueConstraint("run_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    test_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_sec: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RunLogits(Base):
    """Test-set logits (fp16, row order = the test set's), kept so ensembles can be scored later."""

    __tablename__ = "run_logits"

    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16), default="float16")
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # numpy.packbits of (argmax == label) over the whole test set, in its order: what rank bands resample
    # (app.leaderboard.bands) without reading the logits. Null for runs stored before migration 0008.
    correct: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class TestLabels(Base):
    """A competition's test-set labels (uint8, test-set order), written once by the first run that succeeds:
    what ensembles score against and what `correct` is computed from."""

    __tablename__ = "test_labels"
    __test__ = False  # not a pytest class

    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Rescore(Base):
    """An organizer's rescore: chosen entries re-run with fresh seeds as scoring round `round`; `before` holds
    each entry's scores as they were, so Kendall tau between the boards can be reported when it is over."""

    __tablename__ = "rescore"
    __table_args__ = (UniqueConstraint("competition_id", "round"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"), nullable=True)
    round: Mapped[int] = mapped_column(Integer)
    seeds: Mapped[list[int]] = mapped_column(JSON)
    submission_ids: Mapped[list[int]] = mapped_column(JSON)
    threshold: Mapped[float] = mapped_column(Float)
    # {submission_id: {"accuracy": mean public, "private_accuracy": mean private}} at the rescore's start.
    before: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
