from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from app.auth.dependencies import OptionalUser, SessionDep
from app.competitions.models import Competition
from app.competitions.service import get_competition, is_manager
from app.http import error_responses
from app.leaderboard import board as boards
from app.leaderboard.schemas import Board

router = APIRouter(prefix="/api/competitions", tags=["leaderboard"])

BoardName = Annotated[Literal["public", "private"], Query(
    description="public: ranked on the public half (frozen for others after freeze_at); private: each team's "
                "best final entry on the private half, readable after the deadline (organizers: any time).")]
ViewName = Annotated[Literal["accuracy", "efficiency"] | None, Query(
    description="accuracy (band rank) or efficiency (the Pareto front); default: the competition's board_view.")]


class _Reader:
    def __init__(self, slug: str, session: SessionDep, user: OptionalUser) -> None:
        self.session, self.user = session, user
        self.comp: Competition = get_competition(session, slug)
        self.manager = is_manager(self.comp, user)
        self.team_id = boards.viewer_team(session, self.comp, user)

    def board(self, name: str, view: str | None) -> Board:
        return boards.read(self.session, self.comp, manager=self.manager, team_id=self.team_id, name=name,
                          view_name=view)


Reader = Annotated[_Reader, Depends()]


@router.get("/{slug}/leaderboard", response_model=Board, responses=error_responses(401, 403, 404, 422))
def get_leaderboard(reader: Reader, board: BoardName = "public", view: ViewName = None):
    """Each team's best entry with its mean ± std over seeds, per-seed scores, ECE, band rank and Pareto flag.
    A bearer token is optional: with one, your team's configs (and after the freeze its live scores) show."""
    return reader.board(board, view)


@router.get("/{slug}/leaderboard/export", responses={
    200: {"content": {"text/csv": {}, "application/json": {}},
          "description": "Every column of the board: per-seed scores, GPU-hours, ECE, the final-entry flag; "
                         "the private columns only after the close, or to organizers."},
    **error_responses(401, 403, 404, 422)})
def export_leaderboard(reader: Reader, board: BoardName = "public",
                       format: Annotated[Literal["csv", "json"], Query()] = "csv") -> Response:
    b = reader.board(board, "accuracy")
    private = reader.manager or b.phase == "closed"
    columns, rows = boards.export_rows([e.model_dump(mode="json") for e in b.entries], private)
    name = f"{b.competition}-{board}-board"
    if format == "csv":
        return Response(boards.to_csv(columns, rows), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    return JSONResponse({"competition": b.competition, "board": board, "phase": b.phase,
                         "computed_at": b.computed_at.isoformat(), "columns": columns, "rows": rows},
                        headers={"Content-Disposition": f'attachment; filename="{name}.json"'})
