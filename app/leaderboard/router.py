from __future__ import annotations

from fastapi import APIRouter

from app.auth.dependencies import SessionDep
from app.competitions.service import get_competition
from app.hardware import hours_unit
from app.http import error_responses
from app.leaderboard.schemas import Board
from app.leaderboard.service import leaderboard

router = APIRouter(prefix="/api/competitions", tags=["leaderboard"])


@router.get("/{slug}/leaderboard", response_model=Board, responses=error_responses(404))
def get_leaderboard(slug: str, session: SessionDep):
    """Public: each team's best succeeded submission."""
    comp = get_competition(session, slug)
    return Board(competition=comp.slug, title=comp.title, hardware_class=comp.hardware_class,
                 cost_unit=hours_unit(session, comp.hardware_class), entries=leaderboard(session, comp.id))
