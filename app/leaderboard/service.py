"""The leaderboard, ranked in SQL: each team's best succeeded submission.

Order: accuracy (desc), then fewer GPU-seconds, then the earlier submission, then the lower id so the
order is total and stable.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.competitions.models import Team
from app.submissions.models import RunStatus, Submission


def leaderboard(session: Session, competition_id: int) -> list[dict]:
    order = (Submission.accuracy.desc(), Submission.gpu_seconds.asc(), Submission.created_at.asc(),
             Submission.id.asc())
    best = (
        select(
            Submission.id, Submission.team_id, Submission.accuracy, Submission.gpu_seconds,
            Submission.created_at,
            func.row_number().over(partition_by=Submission.team_id, order_by=order).label("nth"),
        )
        .where(Submission.competition_id == competition_id, Submission.status == RunStatus.succeeded)
        .subquery()
    )
    counts = (
        select(Submission.team_id, func.count(Submission.id).label("n"))
        .where(Submission.competition_id == competition_id)
        .group_by(Submission.team_id)
        .subquery()
    )
    ranked = (
        select(
            func.rank().over(order_by=(best.c.accuracy.desc(), best.c.gpu_seconds.asc(),
                                       best.c.created_at.asc(), best.c.id.asc())).label("rank"),
            Team.name.label("team"), best.c.team_id, best.c.id.label("submission_id"),
            best.c.accuracy, (best.c.gpu_seconds / 3600.0).label("gpu_hours"),
            counts.c.n.label("submissions"), best.c.created_at.label("best_at"),
        )
        .join(Team, Team.id == best.c.team_id)
        .join(counts, counts.c.team_id == best.c.team_id)
        .where(best.c.nth == 1)
        .order_by("rank")
    )
    return [dict(r._mapping) for r in session.execute(ranked)]
