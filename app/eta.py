"""A queued submission's position and ETA: where its first queued run stands in the order workers claim runs
(app.submissions.runs.fair_order), and the predicted device-seconds (app.costs) of the work ahead of it,
shared by the live workers of its class."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.models import WorkerNode
from app.admin.service import ONLINE_WITHIN
from app.competitions.models import Competition
from app.db import utcnow
from app.hardware import class_cost_unit
from app.submissions.models import Run, RunStatus, Submission
from app.submissions.runs import fair_order, team_standing


def live_workers(session: Session, queue: str, now: datetime | None = None) -> int:
    """Workers that consume `queue`, reported within ONLINE_WITHIN, and refuse nothing (no problem)."""
    since = (now or utcnow()) - ONLINE_WITHIN
    nodes = session.scalars(select(WorkerNode.queues).where(WorkerNode.last_seen >= since,
                                                            WorkerNode.problem.is_(None)))
    return sum(1 for queues in nodes if queue in queues.split(","))


def annotate(session: Session, sub: Submission) -> dict[str, Any]:
    """The submission's cost unit and, while it is queued or running, its queue position and ETA (the
    fields SubmissionOut leaves to the router)."""
    return annotate_many(session, [sub])[sub.id]


def annotate_many(session: Session, subs: list[Submission]) -> dict[int, dict[str, Any]]:
    """annotate() for many submissions (a listing), ranking each queue once whatever their number."""
    classes = dict(session.execute(select(Competition.id, Competition.hardware_class)
                                   .where(Competition.id.in_({s.competition_id for s in subs}))).all())
    units = {c: class_cost_unit(session, c) for c in set(classes.values())}
    out = {sub.id: {"cost_unit": units[classes[sub.competition_id]]} for sub in subs}
    live = [sub.id for sub in subs if sub.status in (RunStatus.queued, RunStatus.running)]
    if not live:
        return out
    now = utcnow()
    runs: dict[int, list[Any]] = {}  # submission -> its queued and running runs
    for r in session.execute(select(Run.id, Run.submission_id, Run.status, Run.queue, Run.progress,
                                    Run.predicted_seconds)
                             .where(Run.submission_id.in_(live),
                                    Run.status.in_([RunStatus.queued, RunStatus.running]))):
        runs.setdefault(r.submission_id, []).append(r)
    queues = {rs[0].queue for rs in runs.values()}
    lines = {q: _ranks(session, q, [r.id for rs in runs.values() for r in rs
                                    if r.queue == q and r.status == RunStatus.queued]) for q in queues}
    running = {q: _running_left(session, q) for q in queues}
    workers = {q: live_workers(session, q, now) for q in queues}
    by_id = {sub.id: sub for sub in subs}
    for sub_id, rs in runs.items():
        out[sub_id].update(_eta(rs, lines[rs[0].queue], running[rs[0].queue], workers[rs[0].queue],
                                classes[by_id[sub_id].competition_id], now))
    return out


def _eta(mine: list[Any], line: dict[int, tuple[int, float]], running: tuple[int, float], workers: int,
         hardware_class: str, now: datetime) -> dict[str, Any]:
    """Running: the predicted time its runs have left ((1 - progress) x predicted). Queued: the predicted
    work ahead of its first queued run in fair-share order (queued runs before it, plus what the running
    runs of its queue have left), shared by the class's live workers, then its own."""
    left = [(1 - (r.progress or 0.0)) * (r.predicted_seconds or 0.0) for r in mine]
    own = sum(left)
    queued = [line[r.id] for r in mine if r.status == RunStatus.queued and r.id in line]
    if not queued:
        return {"eta_seconds": own, "eta_at": now + timedelta(seconds=own),
                "eta_note": f"running: {own:.0f} s of its predicted time left"}
    ahead, ahead_seconds = min(queued)
    # The running runs of its queue, less its own (counted in `own`).
    count = running[0] - sum(1 for r in mine if r.status == RunStatus.running)
    running_left = running[1] - sum(x for r, x in zip(mine, left, strict=True) if r.status == RunStatus.running)
    said = (f"{ahead} queued runs ahead of it in fair-share order ({ahead_seconds:.0f} s predicted), "
            f"{count} running ({running_left:.0f} s left)")
    if workers == 0:
        return {"queue_position": ahead, "eta_seconds": None, "eta_at": None,
                "eta_note": f"no live worker serves {hardware_class} now; {said}"}
    eta = (ahead_seconds + running_left) / workers + own
    return {"queue_position": ahead, "eta_seconds": eta, "eta_at": now + timedelta(seconds=eta),
            "eta_note": f"{said}, shared by {workers} live {hardware_class} workers; then its own {own:.0f} s"}


def _running_left(session: Session, queue: str) -> tuple[int, float]:
    """(runs training on `queue`, their predicted seconds left: (1 - progress) x predicted)."""
    count, left = session.execute(
        select(func.count(), func.coalesce(func.sum((1 - Run.progress) * func.coalesce(Run.predicted_seconds, 0.0)),
                                           0.0))
        .where(Run.queue == queue, Run.status == RunStatus.running)).one()
    return count, float(left)


def _ranks(session: Session, queue: str, run_ids: list[int]) -> dict[int, tuple[int, float]]:
    """For each of `run_ids` queued on `queue`: (queued runs before it, their predicted seconds), in the order
    workers claim them: claim_next's own fair_order over the same team standing (team_standing, each team's
    keys worked out once)."""
    if not run_ids:
        return {}
    teams = team_standing(queue)
    order = fair_order(teams)
    ranked = (select(Run.id.label("id"), Run.predicted_seconds.label("predicted"),
                     func.row_number().over(order_by=order).label("position"),
                     func.sum(func.coalesce(Run.predicted_seconds, 0.0)).over(order_by=order).label("through"))
              .join(Submission, Submission.id == Run.submission_id).join(teams, teams.c.team_id == Submission.team_id)
              .where(Run.status == RunStatus.queued, Run.queue == queue).subquery())
    rows = session.execute(select(ranked.c.id, ranked.c.position, ranked.c.through, ranked.c.predicted)
                           .where(ranked.c.id.in_(run_ids)))
    return {r.id: (r.position - 1, float(r.through) - (r.predicted or 0.0)) for r in rows}
