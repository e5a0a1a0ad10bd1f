"""Submitting, listing and cancelling; and the one function that derives a submission's status."""

from __future__ import annotations

import logging
import statistics
from datetime import datetime, timedelta

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import costs
from app.auth.models import User
from app.competitions.models import Competition, Membership, Team
from app.config import get_settings
from app.db import utcnow
from app.dispatch import wake_after_commit
from app.errors import Conflict, NotFound, OutsideSearchSpace, QuotaExceeded
from app.leaderboard.service import note_submission
from app.submissions import dedup
from app.submissions.models import TERMINAL, EpochMetric, FailureKind, Run, RunStatus, Submission
from worker.engine.config import RunSpec, TrainConfig, check_in_space
from worker.engine.result import TrainResult

log = logging.getLogger("hparena.submissions")


def check_open(comp: Competition, now: datetime) -> None:
    if comp.starts_at and now < comp.starts_at:
        raise Conflict(f"competition opens at {comp.starts_at.isoformat()}")
    if comp.deadline and now > comp.deadline:
        raise Conflict(f"competition closed at {comp.deadline.isoformat()}")


def check_quota(session: Session, comp: Competition, team_id: int, now: datetime) -> None:
    """Call with the team row locked (lock_team), so parallel POSTs can't all fit one last slot. A submission
    that failed for the infrastructure's reasons is refunded: it does not count."""
    if comp.submission_quota is None:
        return
    q = (select(Submission.created_at)
         .where(Submission.team_id == team_id,
                Submission.failure_kind.is_distinct_from(FailureKind.infrastructure.value))
         .order_by(Submission.created_at))
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


def run_spec(comp: Competition, cfg: TrainConfig, seed: int) -> RunSpec:
    """The whole description of one run: the participant's config and what the competition fixes."""
    return RunSpec(config=cfg, data=comp.dataset, model=comp.model, budget=comp.budget, seed=seed,
                   deterministic=comp.deterministic)


def lock_team(session: Session, team_id: int) -> None:
    """Serialise a team's concurrent submissions on PostgreSQL (a row lock held to commit). SQLite has no
    row locks: there two parallel submissions of one team can both read the quota before either writes."""
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def create_submission(session: Session, comp: Competition, member: Membership | None, user: User,
                      cfg: TrainConfig, idempotency_key: str | None = None, *,
                      baseline_team: Team | None = None) -> tuple[Submission, bool]:
    """-> (the submission, whether it was created now). With an idempotency key the participant already
    used, nothing new is created or charged: the first submission made with that key comes back.

    A baseline (`baseline_team`, the competition's baseline team; `member` None; `user` its organizer) is
    an organizer's reference entry: checked against the search space, deduplicated, priced and queued like
    any other, but no membership, open window, quota or GPU-hour budget applies to it."""
    violations = check_in_space(cfg, comp.search_space, comp.budget)
    if violations:
        raise OutsideSearchSpace(violations)
    specs = [run_spec(comp, cfg, seed) for seed in comp.seeds]
    config = specs[0].config.model_dump(mode="json")
    team_id = baseline_team.id if baseline_team is not None else member.team_id
    lock_team(session, team_id)
    if idempotency_key is not None and (first := _by_key(session, user, idempotency_key)) is not None:
        if first.competition_id != comp.id or first.config != config:
            raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for submission {first.id}, with a "
                           "different competition or config; use a new key for a new submission")
        return first, False
    now = utcnow()
    if baseline_team is None:
        check_open(comp, now)
        check_quota(session, comp, team_id, now)
    # A run identical to an earlier succeeded one reuses its result (dedup) and costs nothing; the others
    # are priced, and the team's GPU-hour budget must cover them. Seeds change no cost: one prediction.
    hashes = {spec.seed: spec.identity() for spec in specs}
    originals = {seed: dedup.find_original(session, comp.id, h) for seed, h in hashes.items()}
    per_run = costs.predict_seconds(session, comp, specs[0])
    predicted = per_run * sum(original is None for original in originals.values())
    if baseline_team is None:
        costs.check_budget(session, comp, team_id, predicted)
    sub = Submission(competition_id=comp.id, team_id=team_id, user_id=user.id, config=config,
                     idempotency_key=idempotency_key, status=RunStatus.queued, created_at=now,
                     predicted_seconds=predicted, is_baseline=baseline_team is not None)
    session.add(sub)
    try:
        session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        # The same key in a request running at this very moment (SQLite has no row lock to wait on).
        raise Conflict(f"a submission with Idempotency-Key {idempotency_key!r} is being made right now; "
                       "retry to get it") from None
    session.execute(update(Team).where(Team.id == team_id).values(submissions=Team.submissions + 1))
    queue = get_settings().queue_for(comp.hardware_class)
    for spec in specs:
        run = Run(submission_id=sub.id, seed=spec.seed, spec=spec, spec_hash=hashes[spec.seed], queue=queue,
                  status=RunStatus.queued, predicted_seconds=per_run)
        session.add(run)
        session.flush()
        if (original := originals[spec.seed]) is not None:
            dedup.reuse(session, run, original)
        else:
            wake_after_commit(session, queue, run.id)
    if any(originals.values()):
        refresh_submission(session, sub.id)
    return sub, True


def _by_key(session: Session, user: User, key: str) -> Submission | None:
    return session.scalar(select(Submission).where(Submission.user_id == user.id,
                                                   Submission.idempotency_key == key))


def get_own_submission(session: Session, user: User, submission_id: int) -> Submission:
    sub = session.get(Submission, submission_id)
    if sub is None or sub.user_id != user.id and not _same_team(session, user, sub):
        raise NotFound(f"no submission {submission_id} of yours")
    return sub


def get_visible_submission(session: Session, user: User, submission_id: int) -> Submission:
    """What a submission's reader may see: its team (get_own_submission), and its competition's organizer and
    admins, who see every config on its board too. Anyone else gets the same 404 as for an id that doesn't
    exist. Acting on it (cancel) stays its team's alone."""
    try:
        return get_own_submission(session, user, submission_id)
    except NotFound:
        from app.competitions.service import is_manager  # app.competitions imports this module

        sub = session.get(Submission, submission_id)
        if sub is not None and is_manager(session.get(Competition, sub.competition_id), user):
            return sub
        raise


def _same_team(session: Session, user: User, sub: Submission) -> bool:
    return session.scalar(select(Membership.id).where(Membership.user_id == user.id,
                                                      Membership.team_id == sub.team_id)) is not None


def list_own(session: Session, user: User, competition_id: int | None) -> list[Submission]:
    teams = select(Membership.team_id).where(Membership.user_id == user.id)
    q = select(Submission).where(Submission.team_id.in_(teams)).order_by(Submission.id.desc())
    if competition_id is not None:
        q = q.where(Submission.competition_id == competition_id)
    return list(session.scalars(q))


def epochs_by_run(session: Session, run_ids: list[int]) -> dict[int, list[EpochMetric]]:
    """Each run's per-epoch metrics in epoch order (a run with none is absent)."""
    out: dict[int, list[EpochMetric]] = {}
    for e in session.scalars(select(EpochMetric).where(EpochMetric.run_id.in_(run_ids))
                             .order_by(EpochMetric.run_id, EpochMetric.epoch)):
        out.setdefault(e.run_id, []).append(e)
    return out


def cancel(session: Session, sub: Submission) -> Submission:
    """Cancel every queued or running run. A running worker notices at its next heartbeat and stops. A run
    cancelled while running is charged its wall time from its start to now; one cancelled while queued,
    nothing."""
    lock_submission(session, sub.id)
    now = utcnow()
    live = session.execute(select(Run.id, Run.status, Run.attempts, Run.started_at).where(
        Run.submission_id == sub.id, Run.status.in_([RunStatus.queued, RunStatus.running]),
        Run.round == 0)).all()  # a rescore's runs are the organizer's: its team can't stop them
    cancelled = 0
    for run in live:
        running = run.status == RunStatus.running and run.started_at is not None
        charged = max(0.0, (now - run.started_at).total_seconds()) if running else 0.0
        # Guarded by what was read: on SQLite nothing is locked, and the worker may have just finished it.
        cancelled += session.execute(
            update(Run).where(Run.id == run.id, Run.status == run.status, Run.attempts == run.attempts)
            .values(status=RunStatus.cancelled, finished_at=now, error="cancelled by participant",
                    charged_seconds=charged)
        ).rowcount
    if cancelled == 0:
        raise Conflict(f"submission {sub.id} is already {sub.status}")
    refresh_submission(session, sub.id)
    return sub


def lock_submission(session: Session, submission_id: int) -> Submission:
    """Row-lock the submission so concurrent run updates derive its status one at a time (PostgreSQL)."""
    return session.scalars(
        select(Submission).where(Submission.id == submission_id).with_for_update().execution_options(
            populate_existing=True)
    ).one()


def derive_status(statuses: list[str]) -> str:
    """One round's runs -> the submission's status: queued until one starts, running until all are over,
    then the first bad outcome (cancelled, failed, diverged) if any, else succeeded."""
    s = set(statuses)
    if not s <= TERMINAL:
        return RunStatus.running if s - {RunStatus.queued} else RunStatus.queued
    for bad in (RunStatus.cancelled, RunStatus.failed, RunStatus.diverged):
        if bad in s:
            return bad
    return RunStatus.succeeded


def refresh_submission(session: Session, submission_id: int) -> Submission:
    """Recompute status and scores from the runs (call with the row locked), and the team's row on the
    leaderboard with them, in the same transaction.

    Runs are grouped by round: 0 holds the submission's own runs, r those rescore r added
    (app.submissions.rescore). The scoring round is the highest whose runs all succeeded; while none has,
    round 0 decides the status as its runs go. So a rescore still running, or one that failed, leaves the
    status and scores as they were. Over the scoring round's runs (one per seed): the mean public accuracy,
    its sample std across seeds (ddof 1, null with one run) and the mean ECE, the private half's likewise,
    and gpu_seconds summed. charged_seconds sums every run's charge (a rescore's runs are charged 0);
    finished_at is when round 0 ended. A submission without runs keeps the status and scores it was given.
    """
    session.flush()
    sub = session.get(Submission, submission_id)
    runs = session.execute(
        select(Run.round, Run.status, Run.accuracy, Run.private_accuracy, Run.ece, Run.private_ece,
               Run.gpu_seconds, Run.error, Run.finished_at, Run.failure_kind, Run.charged_seconds,
               Run.device_mismatch)
        .where(Run.submission_id == submission_id).order_by(Run.id)
    ).all()
    if not runs:
        note_submission(session, sub)
        return sub
    rounds: dict[int, list] = {}
    for r in runs:
        rounds.setdefault(r.round, []).append(r)
    complete = [k for k, rs in rounds.items() if all(r.status == RunStatus.succeeded for r in rs)]
    sub.round = max(complete, default=0)
    scored = rounds.get(sub.round, [])
    sub.status = derive_status([r.status for r in scored])
    sub.gpu_seconds = sum(r.gpu_seconds or 0.0 for r in scored) or None
    charged = [r.charged_seconds for r in runs if r.charged_seconds is not None]
    sub.charged_seconds = sum(charged) if charged else None
    sub.failure_kind = next((r.failure_kind for r in scored if r.failure_kind), None)
    sub.device_mismatch = any(r.device_mismatch for r in scored)
    if sub.status == RunStatus.succeeded:
        sub.accuracy, sub.accuracy_std = _mean_std([r.accuracy for r in scored])
        sub.private_accuracy, sub.private_accuracy_std = _mean_std([r.private_accuracy for r in scored])
        sub.ece = _mean_std([r.ece for r in scored])[0]
        sub.private_ece = _mean_std([r.private_ece for r in scored])[0]
    if sub.status in TERMINAL:
        own = rounds.get(0, scored)
        sub.finished_at = max((r.finished_at for r in own if r.finished_at), default=utcnow())
        errors = [r.error for r in scored if r.error]
        sub.error = errors[0] if errors else None
    session.flush()
    note_submission(session, sub)
    return sub


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof 1) over the seeds' values; std is None for one value, both are None when
    any value is missing (a run stored before the figure was recorded)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def participant_view(result: dict | None) -> dict | None:
    """The engine's stored result without the fields it marks private (computed on the private test half,
    which participants must not tune against). A record this version cannot read is withheld rather than
    shown with fields it cannot tell apart."""
    if result is None:
        return None
    try:
        return TrainResult.model_validate(result).participant_json()
    except ValidationError:
        log.warning("a stored run result does not validate as a TrainResult; withheld from the participant")
        return None
