"""Submitting, listing and cancelling; and the one function that derives a submission's status."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth.models import User
from app.competitions.models import Competition, Membership, Team
from app.config import get_settings
from app.db import enqueue_after_commit, utcnow
from app.queue import send_train
from app.submissions.models import TERMINAL, Run, RunStatus, Submission
from worker.engine.config import TrainConfig, check_in_space


class QuotaExceeded(HTTPException):
    def __init__(self, detail: str, retry_after: int | None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers=headers)


def check_open(comp: Competition, now: datetime) -> None:
    if comp.starts_at and now < comp.starts_at:
        raise HTTPException(status.HTTP_409_CONFLICT, f"competition opens at {comp.starts_at.isoformat()}")
    if comp.deadline and now > comp.deadline:
        raise HTTPException(status.HTTP_409_CONFLICT, f"competition closed at {comp.deadline.isoformat()}")


def check_quota(session: Session, comp: Competition, team_id: int, now: datetime) -> None:
    if comp.submission_quota is None:
        return
    # Serialise a team's concurrent submissions (PostgreSQL) so parallel POSTs can't all fit one last slot.
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update())
    q = select(Submission.created_at).where(Submission.team_id == team_id).order_by(Submission.created_at)
    if comp.quota_window_hours:
        q = q.where(Submission.created_at > now - timedelta(hours=comp.quota_window_hours))
    used = session.scalars(q).all()
    if len(used) < comp.submission_quota:
        return
    if not comp.quota_window_hours:
        raise QuotaExceeded(f"quota of {comp.submission_quota} submissions used; it does not reset", None)
    # The window slides: the oldest counted submission leaves it first.
    frees_at = used[len(used) - comp.submission_quota] + timedelta(hours=comp.quota_window_hours)
    wait = max(1, int((frees_at - now).total_seconds()) + 1)
    raise QuotaExceeded(
        f"quota of {comp.submission_quota} submissions per {comp.quota_window_hours:g} h used; "
        f"the next slot frees at {frees_at.isoformat()} (in {wait} s)",
        wait,
    )


def create_submission(session: Session, comp: Competition, member: Membership, user: User,
                      cfg: TrainConfig) -> Submission:
    if "epochs" not in cfg.model_fields_set:  # unset epochs means "the whole budget"
        cfg = cfg.model_copy(update={"epochs": comp.budget["max_epochs"]})
    errors = check_in_space(cfg, comp.search_space, comp.budget["max_epochs"])
    if errors:
        raise RequestValidationError(errors)
    now = utcnow()
    check_open(comp, now)
    check_quota(session, comp, member.team_id, now)
    sub = Submission(competition_id=comp.id, team_id=member.team_id, user_id=user.id,
                     config=cfg.model_dump(mode="json"), status=RunStatus.queued, created_at=now)
    session.add(sub)
    session.flush()
    queue = get_settings().queue_for(comp.hardware_class)
    for seed in comp.seeds:
        run = Run(submission_id=sub.id, seed=seed, queue=queue, status=RunStatus.queued)
        session.add(run)
        session.flush()
        enqueue_after_commit(session, lambda rid=run.id: send_train(rid, queue))
    return sub


def get_own_submission(session: Session, user: User, submission_id: int) -> Submission:
    sub = session.get(Submission, submission_id)
    if sub is None or sub.user_id != user.id and not _same_team(session, user, sub):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no submission {submission_id} of yours")
    return sub


def _same_team(session: Session, user: User, sub: Submission) -> bool:
    return session.scalar(select(Membership.id).where(Membership.user_id == user.id,
                                                      Membership.team_id == sub.team_id)) is not None


def list_own(session: Session, user: User, competition_id: int | None) -> list[Submission]:
    teams = select(Membership.team_id).where(Membership.user_id == user.id)
    q = select(Submission).where(Submission.team_id.in_(teams)).order_by(Submission.id.desc())
    if competition_id is not None:
        q = q.where(Submission.competition_id == competition_id)
    return list(session.scalars(q))


def cancel(session: Session, sub: Submission) -> Submission:
    """Cancel every queued or running run. A running worker notices at its next heartbeat and stops."""
    lock_submission(session, sub.id)
    result = session.execute(
        update(Run)
        .where(Run.submission_id == sub.id, Run.status.in_([RunStatus.queued, RunStatus.running]))
        .values(status=RunStatus.cancelled, finished_at=utcnow(), error="cancelled by participant")
    )
    if result.rowcount == 0:
        raise HTTPException(status.HTTP_409_CONFLICT, f"submission {sub.id} is already {sub.status}")
    refresh_submission(session, sub.id)
    return sub


def lock_submission(session: Session, submission_id: int) -> Submission:
    """Row-lock the submission so concurrent run updates derive its status one at a time (PostgreSQL)."""
    return session.scalars(
        select(Submission).where(Submission.id == submission_id).with_for_update().execution_options(
            populate_existing=True)
    ).one()


def derive_status(statuses: list[str]) -> str:
    s = set(statuses)
    if not s <= TERMINAL:
        return RunStatus.running if s - {RunStatus.queued} else RunStatus.queued
    for bad in (RunStatus.cancelled, RunStatus.failed, RunStatus.diverged):
        if bad in s:
            return bad
    return RunStatus.succeeded


def refresh_submission(session: Session, submission_id: int) -> Submission:
    """Recompute status, mean accuracy and summed GPU-seconds from the runs (call with the row locked)."""
    session.flush()
    sub = session.get(Submission, submission_id)
    runs = session.execute(
        select(Run.status, Run.accuracy, Run.gpu_seconds, Run.error, Run.finished_at)
        .where(Run.submission_id == submission_id)
    ).all()
    sub.status = derive_status([r.status for r in runs])
    sub.gpu_seconds = sum(r.gpu_seconds or 0.0 for r in runs) or None
    if sub.status == RunStatus.succeeded:
        sub.accuracy = sum(r.accuracy for r in runs) / len(runs)
    if sub.status in TERMINAL:
        sub.finished_at = max((r.finished_at for r in runs if r.finished_at), default=utcnow())
        errors = [r.error for r in runs if r.error]
        sub.error = errors[0] if errors else None
    session.flush()
    return sub


PRIVATE_KEYS = ("private_accuracy", "accuracy_all")


def participant_view(result: dict | None) -> dict | None:
    """The engine's result without anything computed on the private test half, which participants must
    not see (tuning against it would defeat the private board)."""
    if result is None:
        return None
    out = {k: v for k, v in result.items() if k not in PRIVATE_KEYS}
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in ("private",) + PRIVATE_KEYS}
    return out
