"""Cost and ETA before queueing: measured throughput per hardware class, predicted device-seconds per run,
the team's GPU-hour budget, and a queued submission's position and ETA."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.competitions.models import Competition
from worker.engine.config import RunSpec


def predict_seconds(session: Session, comp: Competition, spec: RunSpec) -> float | None:
    """Predicted device-seconds of one run (training + evaluation) on the competition's class."""
    return None  # filled in by the cost work


def check_budget(session: Session, comp: Competition, team_id: int, predicted: float) -> None:
    """Raise BudgetExceeded (429, says how much is left) when `predicted` seconds exceed what is left of the
    team's GPU-hour budget (spent + predicted for its unfinished runs). Call with the team row locked."""
    return None  # filled in by the cost work
