"""A run's life as the worker drives it: claim, heartbeat, per-epoch metrics, finish.

Every write after the claim is fenced by the attempt number the claim returned: a worker that was
presumed dead (stale heartbeat) and replaced can no longer change the run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Subquery, case, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from app import costs
from app.competitions.models import Competition, Team
from app.db import upsert_insert, utcnow
from app.dispatch import wake_after_commit
from app.submissions.models import (
    TERMINAL,
    TRANSITIONS,
    EpochMetric,
    FailureKind,
    Run,
    RunLogits,
    RunStatus,
    Submission,
    TestLabels,
)
from app.submissions.service import lock_submission, lock_team, refresh_submission
from worker.engine.config import RunSpec
from worker.engine.result import EpochRow

log = logging.getLogger("hparena.submissions")
SUPERSEDED = "superseded"  # what a fenced-out worker hears: another attempt owns the run now


@dataclass(frozen=True)
class Claimed:
    """The run is this worker's: train `spec` and write back with `attempt` as the fencing token."""

    run_id: int
    attempt: int
    spec: RunSpec


@dataclass(frozen=True)
class Done:
    """Nothing to do: no queued run for this queue (a spare token), or the run asked for is taken or over."""

    why: str

    def __str__(self) -> str:
        return self.why


@dataclass(frozen=True)
class GaveUp:
    """Its workers were lost too many times: the claim just failed the run for good, saying why."""

    reason: str

    def __str__(self) -> str:
        return f"gave up: {self.reason}"


ClaimResult = Claimed | Done | GaveUp


def claim_next(session: Session, queue: str, hostname: str, *, stale_after: float, max_attempts: int
               ) -> ClaimResult:
    """What a wake-up token (app.dispatch) gets this worker: the run it should train next, if any.

    First a run this very worker left running: a worker trains one run at a time (concurrency 1), so
    such a run belongs to a child process that died (its token came back through reject_on_worker_lost),
    and it is retaken at once instead of after its heartbeat goes stale. If it was lost too often it is
    failed for good, and the token goes on to the next run. Then the fairest queued run (`fair_order`) of a
    team below its competition's running cap (max_running_per_team): a capped team's runs wait, other
    teams' go.
    """
    mine = session.scalars(select(Run.id).where(Run.status == RunStatus.running, Run.queue == queue,
                                                Run.worker_hostname == hostname).order_by(Run.id)).all()
    for run_id in mine:
        got = claim(session, run_id, hostname, stale_after=stale_after, max_attempts=max_attempts)
        if isinstance(got, Claimed):
            return got
    waiting = (Run.status == RunStatus.queued) & (Run.queue == queue) & (Run.attempts < max_attempts)
    cap = Competition.max_running_per_team
    capped: set[int] = set()  # teams found at their cap under their lock (a claim committed since the pick)
    while True:
        teams = team_standing(queue)
        pick = (select(Run.id, Submission.team_id, cap.label("cap"))
                .join(Submission, Submission.id == Run.submission_id)
                .join(Competition, Competition.id == Submission.competition_id)
                .join(teams, teams.c.team_id == Submission.team_id)
                .where(waiting, cap.is_(None) | (teams.c.running < cap))
                .order_by(*fair_order(teams)).limit(1))
        if capped:
            pick = pick.where(Submission.team_id.not_in(capped))
        if session.get_bind().dialect.name == "postgresql":
            # Workers claiming at once each lock a different submission instead of queueing on one (the
            # claim locks the submission first too, so cancel and claim take their locks in one order).
            # Only the submission: the team standing is a grouped subquery, which can't be locked.
            pick = pick.with_for_update(of=Submission, skip_locked=True)
        row = session.execute(pick).first()
        if row is None:
            left = session.scalar(select(func.count()).select_from(Run).where(waiting))
            if left:
                return Done(f"no queued run on {queue} may start now ({left} queued: their teams are at their "
                            "running cap, or other workers are taking them)")
            return Done(f"no queued run on {queue}")
        if row.cap is not None and not _below_cap(session, row.team_id, row.cap):
            capped.add(row.team_id)
            continue
        got = claim(session, row.id, hostname, stale_after=stale_after, max_attempts=max_attempts)
        if isinstance(got, Claimed):
            return got
        # Lost a race for it (SQLite, where nothing was locked): it is someone else's now; pick again.


# Made once: an alias adapts each of its table's columns the first time a query names it (~14 ms a call when
# four fresh aliases were made per call, on every submit, listing and claim).
_STANDING_ALIASES = (aliased(Run), aliased(Submission), aliased(Run), aliased(Submission))


def team_standing(queue: str) -> Subquery:
    """Each team with runs queued on `queue`, with its keys in the fair order, worked out once per team
    (one grouped pass over its runs) rather than again for every one of its queued runs, which made a pick
    from 3,000 queued runs of 12 teams take over a second on PostgreSQL: `running`, how many of its runs
    (on any queue) are training now; `last_start`, when the last of them started (None: never)."""
    r, s, qr, qs = _STANDING_ALIASES
    queued_teams = (select(qs.team_id).join(qr, qr.submission_id == qs.id)
                    .where(qr.status == RunStatus.queued, qr.queue == queue))
    return (select(s.team_id.label("team_id"),
                   func.count(case((r.status == RunStatus.running, 1))).label("running"),
                   func.max(r.started_at).label("last_start"))
            .select_from(s).join(r, r.submission_id == s.id)
            .where(s.team_id.in_(queued_teams)).group_by(s.team_id).subquery("team_standing"))


def fair_order(teams: Subquery) -> tuple[ColumnElement, ...]:
    """Who trains next: the team with the fewest runs training now, then the team whose last run started
    longest ago (never first), then the earliest submission. One team's fifty entries can't hold back
    another team's first.

    `teams` is `team_standing` for the queue, joined to the query's Submission on its team_id."""
    return (teams.c.running.asc(), teams.c.last_start.asc().nulls_first(), Submission.created_at.asc(),
            Run.id.asc())


def _running_of(session: Session, team_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Run).join(Submission, Submission.id == Run.submission_id)
                          .where(Submission.team_id == team_id, Run.status == RunStatus.running)) or 0


def _below_cap(session: Session, team_id: int, cap: int) -> bool:
    """Whether the team may start one more run, counted under its lock so that two workers claiming for
    one team at once count one after the other (the pick saw only committed claims, and another worker's
    may have committed since). Taken after the picked submission's lock: the claim's lock order,
    submission then team (create_submission locks the team only to insert a new submission)."""
    if session.get_bind().dialect.name != "postgresql":
        # SQLite has no row locks. A write takes the database's write lock, held to commit: every claim
        # committed before it is visible to the count, and none can commit during it.
        session.execute(update(Team).where(Team.id == team_id).values(submissions=Team.submissions)
                        .execution_options(synchronize_session=False))
        return _running_of(session, team_id) < cap
    # In a savepoint, so that a team found at its cap is let go at once: a worker never waits for one
    # team's lock while it holds another's, and two workers can't deadlock on two capped teams.
    savepoint = session.begin_nested()
    lock_team(session, team_id)
    if _running_of(session, team_id) < cap:
        savepoint.commit()
        return True
    savepoint.rollback()
    return False


def claim(session: Session, run_id: int, hostname: str, *, stale_after: float, max_attempts: int
          ) -> ClaimResult:
    """Take this run for this worker, or say why not: the guarded UPDATE lets exactly one claimant win.

    Claimable: a queued run; a running one whose heartbeat is stale; one marked running on this very
    worker, whose child died (see claim_next).
    """
    now = utcnow()
    stale = now - timedelta(seconds=stale_after)
    run = session.get(Run, run_id)
    if run is None:
        return Done("no such run")
    lock_submission(session, run.submission_id)
    # Guarded UPDATE: only a queued run, or a running one whose worker died, is claimable.
    dead = (Run.heartbeat_at < stale) | (Run.worker_hostname == hostname)
    taken = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.attempts < max_attempts,
               or_(Run.status == RunStatus.queued,
                   (Run.status == RunStatus.running) & dead))
        .values(status=RunStatus.running, attempts=Run.attempts + 1, started_at=now, heartbeat_at=now,
                worker_hostname=hostname, error=None, progress=0.0, precision=None,
                setup_seconds=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.refresh(run)
    if not taken:
        presumed_dead = run.heartbeat_at is not None and (run.heartbeat_at < stale
                                                          or run.worker_hostname == hostname)
        if run.status == RunStatus.running and run.attempts >= max_attempts and presumed_dead:
            if give_up(session, run, _owned(run.id, run.attempts)):
                session.refresh(run)
                return GaveUp(run.error or "")
        if run.status == RunStatus.running:
            return Done(f"run is running on {run.worker_hostname}")
        return Done(f"run is {run.status}")
    # A retried attempt starts its curve afresh; the earlier attempt's rows would mix into it (its setup
    # report was cleared above: the new attempt sends its own).
    session.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id))
    refresh_submission(session, run.submission_id)
    return Claimed(run_id=run.id, attempt=run.attempts, spec=run.spec)


def _fenced(claim_: Claimed) -> ColumnElement[bool]:
    return _owned(claim_.run_id, claim_.attempt)


def _owned(run_id: int, attempt: int) -> ColumnElement[bool]:
    """The run is still running in this attempt: the fence every write after a claim goes through."""
    return (Run.id == run_id) & (Run.attempts == attempt) & (Run.status == RunStatus.running)


def heartbeat(session: Session, c: Claimed, progress: float, device_name: str | None = None) -> str:
    """Refresh the heartbeat; returns the run's status as this worker should see it: "running" to go on,
    "cancelled" (the participant cancelled it) or SUPERSEDED (another attempt owns it) to stop."""
    values: dict[str, Any] = {"heartbeat_at": utcnow(), "progress": progress}
    if device_name:
        values["device_name"] = device_name
    session.execute(update(Run).where(_fenced(c)).values(**values).execution_options(synchronize_session=False))
    return _as_seen_by(session, c)


def _as_seen_by(session: Session, c: Claimed) -> str:
    status, attempts = session.execute(select(Run.status, Run.attempts).where(Run.id == c.run_id)).one()
    return status if attempts == c.attempt else SUPERSEDED


def record_setup(session: Session, c: Claimed, precision: str, setup_seconds: float) -> None:
    """The engine's setup report (SetupEvent), before the first step: what a running run shows of how it runs.
    A retried attempt overwrites its predecessor's (each claim clears them)."""
    session.execute(update(Run).where(_fenced(c)).values(precision=precision, setup_seconds=setup_seconds,
                                                          heartbeat_at=utcnow())
                    .execution_options(synchronize_session=False))


def record_epoch(session: Session, c: Claimed, row: EpochRow, progress: float) -> None:
    """One row per epoch, written as it happens; a retried attempt overwrites its predecessor's rows."""
    if session.scalar(select(Run.attempts).where(_fenced(c))) is None:
        return
    session.execute(delete(EpochMetric).where(EpochMetric.run_id == c.run_id, EpochMetric.epoch == row.epoch))
    session.execute(insert(EpochMetric).values(
        run_id=c.run_id, epoch=row.epoch, train_loss=_finite(row.train_loss), test_accuracy=row.test_accuracy,
        lr=row.lr, images_per_sec=row.images_per_sec, seconds=row.seconds, recorded_at=utcnow()))
    session.execute(update(Run).where(_fenced(c)).values(heartbeat_at=utcnow(), progress=progress)
                    .execution_options(synchronize_session=False))


def _finite(v: float | None) -> float | None:
    return v if v is not None and v == v and abs(v) != float("inf") else None


def finish(session: Session, c: Claimed, status: RunStatus, *, failure_kind: FailureKind | None = None,
           **fields: Any) -> str | None:
    """Write the final state and what the run is charged (`charge`). A failed run says why in `failure_kind`
    (config when not given); a diverged one is a config failure. None when written; else why this worker no
    longer owns the run: "cancelled" or SUPERSEDED."""
    if status not in TERMINAL or status not in TRANSITIONS[RunStatus.running]:
        raise ValueError(f"run {c.run_id}: a worker can't move a running run to {status}")
    if status == RunStatus.diverged:
        failure_kind = FailureKind.config  # its own hyperparameters made the loss blow up
    elif status == RunStatus.failed:
        failure_kind = failure_kind or FailureKind.config
    run = session.get(Run, c.run_id)
    sub = lock_submission(session, run.submission_id)
    logits, labels = fields.pop("logits", None), fields.pop("labels", None)
    # A rescore's runs (round > 0) were asked for by the organizer: the team pays nothing for them.
    charged = charge(failure_kind, fields.get("gpu_seconds"), fields.get("wall_seconds")) if run.round == 0 else 0.0
    fields.update(failure_kind=failure_kind and failure_kind.value, charged_seconds=charged)
    # Guarded by status and attempt in the UPDATE itself: on SQLite the lock above is no lock, so a cancel
    # or a reclaim committed a moment ago must make this write a no-op rather than be overwritten.
    written = session.execute(
        update(Run).where(_fenced(c)).values(status=status, finished_at=utcnow(), **fields,
                                             **({"progress": 1.0} if status == RunStatus.succeeded else {}))
        .execution_options(synchronize_session=False)
    ).rowcount
    if not written:
        return _as_seen_by(session, c)
    if logits is not None:
        _store_logits(session, c.run_id, sub.competition_id, np.asarray(logits),
                     None if labels is None else np.asarray(labels))
    refresh_submission(session, run.submission_id)
    if status == RunStatus.succeeded:
        costs.learn(session, run)  # its measured images/s price the next submissions
    _wake_capped_team(session, run)
    return None


def _store_logits(session: Session, run_id: int, competition_id: int, logits: np.ndarray,
                 labels: np.ndarray | None) -> None:
    """Keep a succeeded run's fp16 test logits and which test images it got right (what rank bands resample),
    and the competition's test labels, written by its first success and only compared afterwards."""
    correct = None
    if labels is not None and labels.shape == logits.shape[:1]:
        correct = np.packbits(logits.argmax(1) == labels).tobytes()
        _store_labels(session, competition_id, labels)
    elif labels is not None:
        log.error("run %s: %d labels for %d rows of logits; per-image correctness not stored", run_id,
                  labels.shape[0], logits.shape[0])
    session.merge(RunLogits(run_id=run_id, rows=logits.shape[0], cols=logits.shape[1], dtype="float16",
                            data=logits.astype(np.float16).tobytes(), correct=correct))


def _store_labels(session: Session, competition_id: int, labels: np.ndarray) -> None:
    """ON CONFLICT DO NOTHING: two first successes finishing at once both try, one row results. A stored row
    that differs (the competition's data changed under it) is kept and reported, never overwritten: every
    stored `correct` and every ensemble was scored against it."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        log.error("competition %s: test labels outside 0..255 can't be stored as uint8", competition_id)
        return
    data = labels.astype(np.uint8).tobytes()
    # RETURNING, not rowcount: an ORM-enabled INSERT on psycopg reports a rowcount of -1.
    written = session.execute(upsert_insert(session.get_bind(), TestLabels).values(
        competition_id=competition_id, rows=len(labels), data=data).on_conflict_do_nothing()
        .returning(TestLabels.competition_id)).first()
    if written is not None:
        return
    stored = session.get(TestLabels, competition_id)
    if stored is not None and (stored.rows, stored.data) != (len(labels), data):
        log.error("competition %s: a run's test labels (%d rows) differ from the stored ones (%d rows); the "
                  "stored labels are kept", competition_id, len(labels), stored.rows)


def _wake_capped_team(session: Session, run: Run) -> None:
    """A run of a team under a running cap ended. Its team's queued runs may have lost their tokens to
    claims that skipped them while the team was at its cap: send one for the slot this run freed, once
    this commits (a spare token costs one empty claim; the reconciler would catch up, but only at its
    next sweep)."""
    team_id, cap = session.execute(
        select(Submission.team_id, Competition.max_running_per_team)
        .join(Competition, Competition.id == Submission.competition_id).where(Submission.id == run.submission_id)
    ).one()
    if cap is None:
        return
    next_id = session.scalar(
        select(Run.id).join(Submission, Submission.id == Run.submission_id)
        .where(Submission.team_id == team_id, Run.status == RunStatus.queued, Run.queue == run.queue)
        .order_by(Run.id).limit(1))
    if next_id is not None:
        wake_after_commit(session, run.queue, next_id)


def stale_heartbeat(cutoff: datetime) -> ColumnElement[bool]:
    """A running run whose worker vanished: its last heartbeat is older than `cutoff` (now - stale_after).
    The sweep requeues these; the admin fleet lists them."""
    return (Run.status == RunStatus.running) & (Run.heartbeat_at < cutoff)


def requeue_stale(session: Session, *, stale_after: float, max_attempts: int) -> list[tuple[int, str]]:
    """Runs whose worker vanished (no heartbeat for `stale_after`) go back to queued, or fail for good.

    This covers what the broker cannot: a whole worker node lost with its unacked message (the filesystem
    broker never redelivers; Redis only after the visibility timeout). The guarded UPDATE makes the
    sweep safe to run from every worker at once: only one of them wins each run. Returns the
    (run_id, queue) pairs to send a fresh token for.
    """
    stale = utcnow() - timedelta(seconds=stale_after)
    candidates = session.execute(
        select(Run.id, Run.submission_id, Run.queue, Run.attempts, Run.worker_hostname)
        .where(stale_heartbeat(stale))
    ).all()
    requeued = []
    for run_id, submission_id, queue, attempts, host in candidates:
        lock_submission(session, submission_id)
        guard = _owned(run_id, attempts) & (Run.heartbeat_at < stale)
        if attempts >= max_attempts:
            give_up(session, session.get(Run, run_id, populate_existing=True), guard)
            continue
        won = session.execute(update(Run).where(guard).values(
            status=RunStatus.queued, error=f"worker {host} stopped heartbeating; requeued",
        ).execution_options(synchronize_session=False)).rowcount
        if won:
            requeued.append((run_id, queue))
            refresh_submission(session, submission_id)
    return requeued


def give_up(session: Session, run: Run, guard: ColumnElement[bool]) -> bool:
    """Fail a run whose worker was lost on every allowed attempt, saying so with the last known cause: an
    infrastructure failure, refunded (charged nothing).
    `guard` makes it a no-op if the run changed since it was read (another sweeper, a late heartbeat)."""
    reason = f"worker lost {run.attempts} times (last on {run.worker_hostname}); giving up"
    if run.error:
        reason = f"{reason}. Last failure: {run.error}"
    won = session.execute(update(Run).where(guard).values(
        status=RunStatus.failed, finished_at=utcnow(), error=reason[:4000],
        failure_kind=FailureKind.infrastructure.value, charged_seconds=charge(FailureKind.infrastructure),
    ).execution_options(synchronize_session=False)).rowcount
    if won:
        refresh_submission(session, run.submission_id)
    return bool(won)


def charge(kind: FailureKind | None, gpu_seconds: float | None = None, wall_seconds: float | None = None
           ) -> float:
    """What a run that ended so (failure `kind`, None when it did not fail) costs its team, in device-seconds:
    nothing when the infrastructure failed it (refunded); its wall time when it timed out, or when it
    failed before the engine measured its device time; else its device time."""
    if kind == FailureKind.infrastructure:
        return 0.0
    if kind == FailureKind.timeout or gpu_seconds is None:
        return wall_seconds or 0.0
    return gpu_seconds


def retry(session: Session, c: Claimed, reason: str, *, max_attempts: int, **fields: Any) -> str:
    """This attempt failed for a reason outside the run (`reason`, in words): the run goes back to queued,
    and a token is sent once this commits, while it has attempts left (the next one resumes from its
    checkpoint); after the last it fails for good as `infrastructure`, refunded. Returns "queued" or
    "failed", or why this worker no longer owns the run ("cancelled" or SUPERSEDED)."""
    if c.attempt >= max_attempts:
        error = f"failed on all {max_attempts} attempts for reasons outside the run (not charged); last: {reason}"
        return finish(session, c, RunStatus.failed, failure_kind=FailureKind.infrastructure, error=error[:4000],
                      **fields) or RunStatus.failed
    run = session.get(Run, c.run_id)
    lock_submission(session, run.submission_id)
    error = (f"attempt {c.attempt} of {max_attempts} failed for a reason outside the run, so it was "
             f"requeued: {reason}")
    written = session.execute(update(Run).where(_fenced(c)).values(status=RunStatus.queued, error=error[:4000])
                              .execution_options(synchronize_session=False)).rowcount
    if not written:
        return _as_seen_by(session, c)
    refresh_submission(session, run.submission_id)
    wake_after_commit(session, run.queue, c.run_id)
    return RunStatus.queued


def checkpoint_dir(root: Path, run_id: int) -> Path:
    """Where every attempt of a run saves and finds its checkpoint (worker.engine.checkpoint)."""
    return root / f"run-{run_id}"


def finished_checkpoints(session: Session, root: Path) -> list[Path]:
    """Checkpoint directories under `root` that nothing will resume: their run is over (also when it ended
    without a worker: cancelled while queued, given up by the sweep) or unknown to this database."""
    found = {int(m.group(1)): d for d in (root.glob("run-*") if root.is_dir() else ())
             if (m := re.fullmatch(r"run-(\d+)", d.name)) and d.is_dir()}
    if not found:
        return []
    live = set(session.scalars(select(Run.id).where(
        Run.id.in_(found), Run.status.in_([RunStatus.queued, RunStatus.running]))))
    return [d for run_id, d in sorted(found.items()) if run_id not in live]


def record_lost_child(session: Session, hostname: str, reason: str) -> list[int]:
    """The worker's parent saw its child die (a native crash, the OOM killer): say so on the run the child
    was training (the one running on this worker), which stays running until the redelivered token
    retakes it or gives up. Returns that run's id (none if the child died before claiming, or if its run was
    already over: a child past its hard time limit writes its run's timeout before it kills itself)."""
    mine = (Run.status == RunStatus.running) & (Run.worker_hostname == hostname)
    ids = list(session.scalars(select(Run.id).where(mine)))
    session.execute(update(Run).where(mine).values(error=reason[:4000]).execution_options(synchronize_session=False))
    return ids
