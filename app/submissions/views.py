"""A submission as its readers see it (the API's responses and the submission page): one assembly for both."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import eta
from app.submissions.models import Submission
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
        runs.append(run)
    return SubmissionDetail(**summary(session, sub).model_dump(), runs=runs)
