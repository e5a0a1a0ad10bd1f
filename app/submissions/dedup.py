"""Dedup: a run whose resolved spec (config, data, model, budget, seed) equals an earlier succeeded run's in
the same competition reuses that run's result instead of training. It costs no GPU-hours and links to
the run that did train; its submission still counts toward the quota."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.submissions.models import Run


def find_original(session: Session, competition_id: int, spec_hash: str) -> Run | None:
    """The earliest succeeded run of this competition that trained (not itself reused) with this spec."""
    return None  # filled in by the dedup work


def reuse(session: Session, run: Run, original: Run) -> None:
    """Make the new queued `run` a succeeded copy of `original`'s result, charged nothing."""
    raise NotImplementedError
