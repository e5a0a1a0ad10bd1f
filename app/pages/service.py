"""What the core pages show, assembled from the JSON API's own services so that a page shows a viewer exactly
what the API would show them: the board through app.leaderboard.board.read (the API's reader), a
submission through the API's visibility rule and assembly (app.submissions.service.get_visible_submission,
app.submissions.views.detail), with its participant view of a run's stored result. No HTTP, no SQL of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.auth.models import User
from app.competitions.models import Competition
from app.competitions.service import get_competition, is_manager, list_competitions
from app.leaderboard import board as boards
from app.leaderboard.schemas import Board
from app.submissions import service as submissions
from app.submissions import views
from app.submissions.models import TERMINAL, Run
from app.submissions.schemas import RunDetail, SubmissionDetail
from worker.engine.result import TrainResult, json_safe

# ----------------------------------------------------------------------------------------------------
# Signing in
# ----------------------------------------------------------------------------------------------------


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site, never another site. An absolute URL, a
    scheme-relative one (//evil.example) or a backslash trick (/\\evil.example, which browsers read as //)
    goes to / instead: an open redirect would let a link to our login page send people anywhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


# ----------------------------------------------------------------------------------------------------
# Competitions
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompetitionRow:
    competition: Competition
    phase: str  # open, frozen or closed (app.leaderboard.board.phase)


def competitions(session: Session) -> list[CompetitionRow]:
    return [CompetitionRow(c, boards.phase(c)) for c in list_competitions(session)]


# ----------------------------------------------------------------------------------------------------
# The board
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardPage:
    board: Board  # exactly what GET /api/competitions/{slug}/leaderboard answers this viewer
    other_board: str | None  # the other board this viewer may switch to, if any


def board_page(session: Session, slug: str, user: User | None, name: str | None, view: str | None) -> BoardPage:
    """The board for the page: by default the public board during the contest and the private board after
    the close. Asking for the private board before the close is Forbidden, as in the API, except for the
    competition's organizers and admins."""
    comp = get_competition(session, slug)
    manager = is_manager(comp, user)
    closed = boards.phase(comp) == "closed"
    name = name or ("private" if closed else "public")
    b = boards.read(session, comp, manager=manager, team_id=boards.viewer_team(session, comp, user), name=name,
                    view_name=view)
    other = "public" if name == "private" else "private"
    return BoardPage(board=b,
                     other_board=other if manager or closed else None)


def board_json(page: BoardPage) -> dict[str, Any]:
    return {"board": page.board.model_dump(mode="json")}


# ----------------------------------------------------------------------------------------------------
# A submission
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunView:
    """One run (one seed) as its team sees it, with what its stored result says about how it ran."""

    detail: RunDetail
    label: str  # "seed 0", or "seed 7 (rescore 1)"
    device: str | None
    precision: str | None
    # setup, train, eval seconds: the stored result's Timings once over; while it runs, the worker's setup
    # report and the training seconds so far (eval None); all None before its setup is reported.
    timings: dict[str, float | None]


@dataclass(frozen=True)
class SubmissionPage:
    detail: SubmissionDetail
    competition: Competition
    terminal: bool
    runs: list[RunView] = field(default_factory=list)


def submission_page(session: Session, user: User, submission_id: int) -> SubmissionPage:
    sub = submissions.get_visible_submission(session, user, submission_id)
    detail = views.detail(session, sub)
    runs = [_run_view(r, d) for r, d in zip(sub.runs, detail.runs, strict=True)]
    return SubmissionPage(detail=detail, competition=session.get(Competition, sub.competition_id),
                          terminal=sub.status in TERMINAL, runs=runs)


def _run_view(run: Run, detail: RunDetail) -> RunView:
    label = f"seed {run.seed}" + (f" (rescore {run.round})" if run.round else "")
    record = _record(run.result)
    if record is None:  # not over yet: the device, precision and setup the worker reported, training so far
        return RunView(detail=detail, label=label, device=run.device_name, precision=run.precision,
                       timings={"setup": run.setup_seconds, "train": detail.train_seconds, "eval": None})
    t = record.timings
    return RunView(detail=detail, label=label, device=f"{record.device.name} ({record.device.type})",
                   precision=record.precision,
                   timings={"setup": t.setup_seconds, "train": t.train_seconds, "eval": t.eval_seconds})


def _record(result: dict[str, Any] | None) -> TrainResult | None:
    """The run's stored result, typed; only its non-private fields (device, precision, timings) are shown."""
    if result is None:
        return None
    try:
        return TrainResult.model_validate(result)
    except ValidationError:
        return None


def live_json(page: SubmissionPage) -> dict[str, Any]:
    """What submission.js polls: status, failure, queue position and ETA, and each run's curve so far."""
    d = page.detail
    return json_safe({
        "id": d.id, "status": d.status, "terminal": page.terminal, "failure": d.failure_reason,
        "accuracy": d.accuracy, "accuracy_std": d.accuracy_std,
        "queue_position": d.queue_position, "eta_seconds": d.eta_seconds, "eta_at": _iso(d.eta_at),
        "eta_note": d.eta_note,
        "runs": [{"id": v.detail.id, "seed": v.detail.seed, "round": v.detail.round, "label": v.label,
                  "status": v.detail.status, "progress": v.detail.progress, "device": v.device,
                  "precision": v.precision, "timings": v.timings,
                  "epochs": [e.model_dump(mode="json") for e in v.detail.epochs]} for v in page.runs],
    })


def _iso(x: datetime | None) -> str | None:
    return None if x is None else x.isoformat()
