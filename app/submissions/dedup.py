"""Dedup: a run whose resolved spec (config, data, model, budget, seed) equals an earlier succeeded run's in
the same competition reuses that run's result instead of training. It costs no GPU-hours and links to
the run that did train; its submission still counts toward the quota (it is a submission like any other).

Only a run that trained can be an original (never a reused copy, so every link points at the computation
itself), and only one whose device matched its competition's class: a flagged result is not copied onto
new entries, which train anew on the right hardware instead.
"""

from __future__ import annotations

import copy

from sqlalchemy import insert, literal, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.submissions.models import EpochMetric, Run, RunLogits, RunStatus, Submission


def find_original(session: Session, competition_id: int, spec_hash: str) -> Run | None:
    """The earliest succeeded run of this competition that trained (not itself reused) with this spec, on
    its class's device. One query, on the indexed spec_hash."""
    return session.scalars(
        select(Run).join(Submission, Submission.id == Run.submission_id)
        .where(Run.spec_hash == spec_hash, Submission.competition_id == competition_id,
               Run.status == RunStatus.succeeded, Run.reused_from_run_id.is_(None), Run.device_mismatch.is_(None))
        .order_by(Run.id).limit(1)
    ).first()


def reuse(session: Session, run: Run, original: Run) -> None:
    """Make the new queued `run` (flushed, no token sent for it) a succeeded copy of `original`'s result.

    Copied: the result record and its indexed columns, the epoch curve, the test-set logits (ensembles
    score each run's logits) and their per-image correctness (rank bands resample it). gpu_seconds stays the
    original's measured figure, because it describes the result (the board's tie-break on GPU-hours must not
    favour a copy over the run that paid for it); what this run cost its team is charged_seconds, 0. No
    worker touched it: attempts 0, no hostname, no wall time. The caller refreshes the submission.
    """
    now = utcnow()
    run.status = RunStatus.succeeded
    run.reused_from_run_id = original.id
    run.result = copy.deepcopy(original.result)
    for column in ("accuracy", "private_accuracy", "ece", "private_ece", "gpu_seconds", "stop_reason",
                   "device_name", "precision", "setup_seconds", "diverged_epoch", "diverged_step",
                   "device_mismatch"):
        setattr(run, column, getattr(original, column))
    run.attempts, run.progress = 0, 1.0
    run.started_at = run.finished_at = now
    run.predicted_seconds = run.charged_seconds = 0.0
    session.flush()
    curve = ("epoch", "train_loss", "test_accuracy", "lr", "images_per_sec", "seconds", "recorded_at")
    session.execute(insert(EpochMetric).from_select(
        ("run_id", *curve),
        select(literal(run.id), *(getattr(EpochMetric, c) for c in curve)).where(EpochMetric.run_id == original.id)))
    logits = ("rows", "cols", "dtype", "data", "correct")
    session.execute(insert(RunLogits).from_select(
        ("run_id", *logits),
        select(literal(run.id), *(getattr(RunLogits, c) for c in logits)).where(RunLogits.run_id == original.id)))
