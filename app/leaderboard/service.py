"""The leaderboard, ranked in SQL: each team's best succeeded submission.

Order: accuracy (desc), then fewer GPU-seconds, then the earlier submission, then the lower id so the
order is total and stable.

The board ranks `team_best` (one row per team, leaderboard.models.TeamBest), not the submissions: a
request sorts as many rows as there are teams. `note_submission` keeps that table right in the same
transaction that changes a submission's status, so the board never shows a state the submissions don't.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Select, delete, false, func, insert, select, update
from sqlalchemy.orm import Session

from app.competitions.models import Competition, Team
from app.db import upsert_insert
from app.leaderboard.models import TeamBest
from app.submissions.models import RunStatus, Submission

_COLUMNS = ("competition_id", "team_id", "submission_id", "accuracy", "gpu_seconds", "submitted_at")


def leaderboard(session: Session, competition_id: int) -> list[dict]:
    b = TeamBest
    ranked = (
        select(
            func.rank().over(order_by=(b.accuracy.desc(), b.gpu_seconds.asc(), b.submitted_at.asc(),
                                       b.submission_id.asc())).label("rank"),
            Team.name.label("team"), b.team_id, b.submission_id, b.accuracy,
            (b.gpu_seconds / 3600.0).label("gpu_hours"), Team.submissions.label("submissions"),
            b.submitted_at.label("best_at"), Submission.device_mismatch,
        )
        .join(Team, Team.id == b.team_id)
        .join(Submission, Submission.id == b.submission_id)
        .where(b.competition_id == competition_id)
        .order_by("rank")
    )
    result = session.execute(ranked)
    keys = list(result.keys())  # once: dict(row._mapping) rebuilds the keys for each of a thousand rows
    return [dict(zip(keys, row, strict=True)) for row in result]


def note_submission(session: Session, sub: Submission) -> None:
    """Bring the team's best row up to date after `sub`'s status changed. Called by refresh_submission with
    the submission row locked and its new status flushed, in the transaction that changed it. The cached
    boards (leaderboard.board) go stale with it; a baseline has no team row (it takes no rank)."""
    from app.leaderboard import board  # board imports this module

    if sub.status != RunStatus.succeeded:
        # Only a best submission that stopped succeeding matters, and that is not normally possible (a
        # succeeded submission's runs are all over): one indexed look-up, no lock, for every other change.
        # A claim, a requeue or a failure of another submission changes no board.
        if session.scalar(select(TeamBest.team_id).where(TeamBest.submission_id == sub.id)) is not None:
            board.bump(session, sub.competition_id)
            _set_best(session, sub, Submission.team_id == sub.team_id)
        return
    board.bump(session, sub.competition_id)  # a result landed (or a rescore's round changed its scores)
    if sub.is_baseline:
        return
    if _insert_if_absent(session, sub):
        return
    # Locked: two of a team's submissions finishing at once compare one after the other, the second against
    # the first's outcome (PostgreSQL re-reads a row it waited for; _set_best updates it, never deletes and
    # re-inserts it, so the waiter finds the new version).
    best = session.scalar(select(TeamBest.submission_id).where(_of_team(sub)).with_for_update())
    best_still_counts = best is not None and best != sub.id and session.scalar(
        select(Submission.status).where(Submission.id == best)) == RunStatus.succeeded
    if best_still_counts:
        _set_best(session, sub, Submission.id.in_((best, sub.id)))
    else:
        # The best itself changed (not normally possible): look at all the team's submissions again.
        _set_best(session, sub, Submission.team_id == sub.team_id)


def rebuild_best(session: Session, competition_id: int) -> None:
    """Rebuild a competition's team_best from its submissions, as migration 0006 backfilled it: for rows
    written in bulk without refresh_submission (bench/api_load.py seeds 100,000 this way)."""
    session.execute(delete(TeamBest).where(TeamBest.competition_id == competition_id))
    session.execute(insert(TeamBest).from_select(
        _COLUMNS, best_per_team(Submission.competition_id == competition_id)))


def best_per_team(*where: ColumnElement[bool]) -> Select:
    """Each team's best succeeded submission among those matching `where`, as team_best's columns
    (baselines are no team's entry)."""
    order = (Submission.accuracy.desc(), Submission.gpu_seconds.asc(), Submission.created_at.asc(),
             Submission.id.asc())
    ranked = (
        select(Submission.competition_id, Submission.team_id, Submission.id.label("submission_id"),
               Submission.accuracy, Submission.gpu_seconds, Submission.created_at.label("submitted_at"),
               func.row_number().over(partition_by=Submission.team_id, order_by=order).label("nth"))
        .where(Submission.status == RunStatus.succeeded, Submission.is_baseline.is_(false()), *where)
        .subquery()
    )
    return select(*(ranked.c[c] for c in _COLUMNS)).where(ranked.c.nth == 1)


def final_entries(comp: Competition, team_id: int | None = None) -> Select:
    """(team_id, submission_id) of each team's final entries, the one rule the private board, the team's own
    view and rescores share: the team's marked entries that succeeded, at most `comp.final_entries` of them
    (the latest marked, if the organizer lowered the limit); a team none of whose marks succeeded is judged
    on its best public entry. Only results that landed by the deadline count. Never chosen by private score.
    """
    landed = [Submission.competition_id == comp.id, Submission.status == RunStatus.succeeded,
              Submission.is_baseline.is_(false())]
    if comp.deadline is not None:
        landed.append(Submission.finished_at <= comp.deadline)
    if team_id is not None:
        landed.append(Submission.team_id == team_id)
    nth = func.row_number().over(partition_by=Submission.team_id,
                                 order_by=(Submission.final_at.desc(), Submission.id.desc())).label("nth")
    marked = select(Submission.team_id, Submission.id.label("submission_id"), nth).where(
        *landed, Submission.final).subquery()
    chosen = select(marked.c.team_id, marked.c.submission_id).where(marked.c.nth <= comp.final_entries)
    best = best_per_team(*landed).subquery()
    default = select(best.c.team_id, best.c.submission_id).where(best.c.team_id.not_in(select(marked.c.team_id)))
    return chosen.union_all(default)


def _of_team(sub: Submission) -> ColumnElement[bool]:
    return (TeamBest.competition_id == sub.competition_id) & (TeamBest.team_id == sub.team_id)


def _insert_if_absent(session: Session, sub: Submission) -> bool:
    """The team's first succeeded submission is its best. ON CONFLICT: a concurrent first one waits for
    this insert and then finds the row (a plain INSERT would fail the second worker's whole write)."""
    ins = upsert_insert(session.get_bind(), TeamBest).values(
        competition_id=sub.competition_id, team_id=sub.team_id, submission_id=sub.id, accuracy=sub.accuracy,
        gpu_seconds=sub.gpu_seconds, submitted_at=sub.created_at)
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING.
    return session.execute(ins.on_conflict_do_nothing().returning(TeamBest.team_id)).first() is not None


def _set_best(session: Session, sub: Submission, scope: ColumnElement[bool]) -> None:
    """Make the team's row the best of its submissions matching `scope`, ordered as the board orders them
    (by the database, so NULL GPU-seconds sort where the board sorts them)."""
    top = session.execute(best_per_team(scope)).first()
    if top is None:
        session.execute(delete(TeamBest).where(_of_team(sub)))
        return
    values = top._asdict()
    del values["competition_id"], values["team_id"]
    session.execute(update(TeamBest).where(_of_team(sub)).values(**values)
                    .execution_options(synchronize_session=False))
