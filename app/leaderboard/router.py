from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from app.auth.dependencies import SessionDep
from app.competitions.service import get_competition
from app.http import error_responses
from app.leaderboard.service import leaderboard

router = APIRouter(prefix="/api/competitions", tags=["leaderboard"])


class Entry(BaseModel):
    rank: int
    team: str
    team_id: int
    submission_id: int
    accuracy: float
    gpu_hours: float | None
    submissions: int
    best_at: datetime


class Board(BaseModel):
    competition: str
    title: str
    entries: list[Entry]


@router.get("/{slug}/leaderboard", response_model=Board, responses=error_responses(404))
def get_leaderboard(slug: str, session: SessionDep):
    """Public: each team's best succeeded submission."""
    comp = get_competition(session, slug)
    return Board(competition=comp.slug, title=comp.title, entries=leaderboard(session, comp.id))
