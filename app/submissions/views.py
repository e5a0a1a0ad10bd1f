"""A submission as its readers see it (the API's responses and the submission page): one assembly for both."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import eta
from app.submissions.models import FailureKind, RunStatus, Submission
from app.submissions.schemas import EpochOut, RunDetail, SubmissionDetail, SubmissionOut
from app.submissions.service import epochs_by_run, participant_view


def summary(session: Session, sub: Submission) -> SubmissionOut:
    """With its cost unit, and its queue position and ETA while queued or running."""
    return SubmissionOut.model_validate(sub).model_copy(update=eta.annotate(session, sub))


def detail(session: Session, sub: Submission) -> SubmissionDetail:
    """summary() plus each run with its per-epoch curve and its stored result as participants may read it
    (participant_view: no private-half numbers)."""
    epochs = epochs_by_run(session, [r.id for r in sub.runs])
    runs = []
    for r in sub.runs:
        run = RunDetail.model_validate(r)
        run.epochs = [EpochOut.model_validate(e) for e in epochs.get(r.id, [])]
        run.result = participant_view(r.result)
        run.train_seconds = _train_seconds(run)
        runs.append(run)
    out = SubmissionDetail(**summary(session, sub).model_dump(), runs=runs)
    out.failure_reason = failure_reason(out)
    return out


def _train_seconds(run: RunDetail) -> float | None:
    """The result's training seconds once there is one; else the last finished epoch's (cumulative) figure."""
    timings = (run.result or {}).get("timings") or {}
    if timings.get("train_seconds") is not None:
        return timings["train_seconds"]
    return run.epochs[-1].seconds if run.epochs else None


_CONSEQUENCE = {
    FailureKind.infrastructure: "retried automatically and refunded (not charged to your team)",
    FailureKind.config: "caused by the config; charged to your team's budget",
    FailureKind.timeout: "it ran past its time limit; charged to your team's budget",
}
_WHAT = {
    FailureKind.infrastructure: "the worker or the machine failed",
    FailureKind.config: "the run could not go on with this config",
    FailureKind.timeout: "the run ran past its time limit",
}


def failure_reason(detail: SubmissionDetail) -> str | None:
    """Why it did not succeed, in plain words: whose fault (failure_kind), what happened (the run's error),
    and what it cost. None while it runs or once it succeeded."""
    if detail.status == RunStatus.cancelled:
        return f"cancelled: {detail.error or 'by its team'}"
    if detail.status not in (RunStatus.failed, RunStatus.diverged):
        return None
    bad = next((r for r in detail.runs if r.status == detail.status), None)
    if detail.status == RunStatus.diverged:
        where = ""
        if bad is not None and bad.diverged_epoch is not None:
            where = f" at epoch {bad.diverged_epoch}" + (f", step {bad.diverged_step}" if bad.diverged_step else "")
        return (f"config: the training loss diverged (became NaN or infinite){where}; try a lower learning rate; "
                f"{_CONSEQUENCE[FailureKind.config]}")
    try:
        kind = FailureKind(detail.failure_kind or FailureKind.config)
    except ValueError:
        kind = FailureKind.config
    what = (bad.error if bad is not None and bad.error else None) or detail.error or _WHAT[kind]
    return f"{kind.value}: {what}; {_CONSEQUENCE[kind]}"
