"""Rescoring: an organizer re-runs chosen entries, or every final entry, with fresh seeds, and learns how far
the board moved: Kendall tau between the scores before and after, the project's own measure of whether its
ranking means something.

A rescore is scoring round r of its competition (1, 2, ...). It adds one run per fresh seed (seeds no run of
the competition ever used) to each entry, with round r, and keeps the old runs. An entry's scores move to
round r once all its round-r runs succeeded (submissions.service.refresh_submission); until then, or when one
fails, they stay as they were. The runs are the organizer's: charged nothing, outside the team's GPU-hour
budget (app.costs.usage).

Tau is taken over the pairs of entries whose public score before differs by more than the rescore's
threshold (closer pairs are a coin toss either way, and would only add noise): a pair is concordant when the
scores after order it the same way, discordant when the other way, and neither when tied after.
tau = (concordant - discordant) / (concordant + discordant). Likewise over the private half.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import costs
from app.audit.service import record
from app.auth.models import User
from app.competitions.models import Competition, Team
from app.competitions.service import require_manager
from app.config import get_settings
from app.dispatch import wake_after_commit
from app.errors import Conflict, InvalidField, NotFound
from app.leaderboard.service import final_entries as final_entries_of
from app.submissions.models import TERMINAL, Rescore, Run, RunStatus, Submission, SubmissionKind
from app.submissions.service import derive_status

DEFAULT_THRESHOLD = 0.005  # half a point of accuracy: about the seed-to-seed spread of a CIFAR-10 score


# ----------------------------------------------------------------------------------------------------
# Starting one
# ----------------------------------------------------------------------------------------------------


def start(session: Session, comp: Competition, user: User, submission_ids: list[int] | None,
          threshold: float = DEFAULT_THRESHOLD, seeds: list[int] | None = None) -> Rescore:
    """Queue the runs of a new rescore of `submission_ids` (None: every final entry) with `seeds` (None: as
    many fresh seeds as the competition has seeds).

    Named entries must be succeeded train submissions of this competition (a baseline may be one); an
    ensemble has nothing to re-train: its members can be rescored instead. By default, each team's entries
    marked final, or its best entry when it marked none, leaving out those that can't be rescored."""
    require_manager(comp, user)
    if submission_ids is None:
        subs = [s for s in _subs(session, comp, final_entries(session, comp)) if _why_not(s) is None]
        if not subs:
            raise Conflict(f"competition {comp.slug!r} has no final entry that can be rescored (a succeeded, "
                           "trained submission)")
    else:
        subs = _subs(session, comp, submission_ids)
        for sub_id in submission_ids:
            sub = next((s for s in subs if s.id == sub_id), None)
            why = f"no submission {sub_id} in competition {comp.slug!r}" if sub is None else _why_not(sub)
            if why is not None:
                raise InvalidField("submission_ids", sub_id, why, [])
    seeds = _fresh_seeds(session, comp, seeds)
    last = session.scalar(select(func.max(Rescore.round)).where(Rescore.competition_id == comp.id))
    rescore = Rescore(competition_id=comp.id, created_by_id=user.id, round=(last or 0) + 1, seeds=seeds,
                      submission_ids=[s.id for s in subs], threshold=threshold,
                      before={str(s.id): {"accuracy": s.accuracy, "private_accuracy": s.private_accuracy}
                              for s in subs})
    session.add(rescore)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"another rescore of {comp.slug!r} is being started right now; retry") from None
    queue = get_settings().queue_for(comp.hardware_class)
    for sub in subs:
        # The spec its own runs trained (config, data, model, budget), with a fresh seed: the same entry again.
        trained = next(r.spec for r in sub.runs if r.round == 0)
        specs = [trained.model_copy(update={"seed": seed}) for seed in seeds]
        per_run = costs.predict_seconds(session, comp, specs[0])  # seeds change no cost
        for spec in specs:
            run = Run(submission_id=sub.id, seed=spec.seed, spec=spec, spec_hash=spec.identity(), queue=queue,
                      status=RunStatus.queued, predicted_seconds=per_run, round=rescore.round)
            session.add(run)
            session.flush()
            wake_after_commit(session, queue, run.id)
    record(session, user, "rescore.start", f"competition:{comp.slug}", rescore=rescore.id, round=rescore.round,
           submission_ids=rescore.submission_ids, seeds=seeds, threshold=threshold)
    return rescore


def final_entries(session: Session, comp: Competition) -> list[int]:
    """Every team's final entries (leaderboard.service.final_entries: the one rule)."""
    return sorted(session.scalars(select(final_entries_of(comp).subquery().c.submission_id)))


def _subs(session: Session, comp: Competition, ids: list[int]) -> list[Submission]:
    return list(session.scalars(select(Submission).where(Submission.competition_id == comp.id,
                                                         Submission.id.in_(ids)).order_by(Submission.id)))


def _why_not(sub: Submission) -> str | None:
    """Why `sub` can't be rescored, or None when it can."""
    if sub.kind == SubmissionKind.ensemble:
        return (f"submission {sub.id} is an ensemble: it trains nothing to re-run (rescore its members "
                f"{sub.members} instead)")
    if sub.status != RunStatus.succeeded:
        return f"submission {sub.id} is {sub.status}: only a succeeded submission has a score to rescore"
    return None


def _fresh_seeds(session: Session, comp: Competition, asked: list[int] | None) -> list[int]:
    """`asked`, when none of them was used by a run of this competition (nor is one of its seeds); None:
    as many seeds as the competition has, counting up from above every seed used so far."""
    used = set(session.scalars(select(Run.seed).join(Submission, Submission.id == Run.submission_id)
                               .where(Submission.competition_id == comp.id).distinct())) | set(comp.seeds)
    if asked is None:
        first = max(used, default=-1) + 1
        return list(range(first, first + len(comp.seeds)))
    stale = sorted(set(asked) & used)
    if stale:
        raise InvalidField("seeds", stale, f"seeds {stale} were already used in competition {comp.slug!r}; a "
                                           "rescore needs fresh ones (or leave seeds out to get some)", [])
    return list(asked)


# ----------------------------------------------------------------------------------------------------
# Reporting on one
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RescoreRun:
    id: int
    seed: int
    status: str
    accuracy: float | None
    private_accuracy: float | None


@dataclass(frozen=True)
class Entry:
    submission_id: int
    team_id: int
    team: str
    status: str  # of its runs in this round (derive_status)
    before_accuracy: float | None
    after_accuracy: float | None  # mean over this round's runs, once they all succeeded
    before_private_accuracy: float | None
    after_private_accuracy: float | None
    runs: list[RescoreRun]


@dataclass(frozen=True)
class Tau:
    tau: float | None  # None when no pair was concordant or discordant
    pairs: int  # pairs whose score before differs by more than the threshold (both scored after)
    concordant: int
    discordant: int
    tied_after: int
    within_threshold: int  # pairs left out: their scores before were too close


@dataclass(frozen=True)
class Report:
    id: int
    competition: str
    round: int
    seeds: list[int]
    threshold: float
    submission_ids: list[int]
    created_at: datetime
    created_by_id: int | None
    status: str  # "running" while any of its runs is not over, then "done"
    entries: list[Entry]
    failed: list[int]  # entries of which a run did not succeed (their scores stayed as they were)
    public: Tau | None  # once done
    private: Tau | None


def get(session: Session, comp: Competition, user: User, rescore_id: int) -> Report:
    require_manager(comp, user)
    rescore = session.get(Rescore, rescore_id)
    if rescore is None or rescore.competition_id != comp.id:
        raise NotFound(f"no rescore {rescore_id} of competition {comp.slug!r}")
    return report(session, comp, rescore)


def list_for(session: Session, comp: Competition, user: User) -> list[Report]:
    """The competition's rescores, the latest first."""
    require_manager(comp, user)
    rescores = session.scalars(select(Rescore).where(Rescore.competition_id == comp.id)
                               .order_by(Rescore.round.desc()))
    return [report(session, comp, r) for r in rescores]


def report(session: Session, comp: Competition, rescore: Rescore) -> Report:
    rows = session.execute(
        select(Run.id, Run.submission_id, Run.seed, Run.status, Run.accuracy, Run.private_accuracy)
        .where(Run.submission_id.in_(rescore.submission_ids), Run.round == rescore.round).order_by(Run.id)).all()
    teams = dict(session.execute(select(Submission.id, Submission.team_id)
                                 .where(Submission.id.in_(rescore.submission_ids))).all())
    names = dict(session.execute(select(Team.id, Team.name).where(Team.id.in_(set(teams.values())))).all())
    entries = []
    for sub_id in rescore.submission_ids:
        runs = [RescoreRun(r.id, r.seed, r.status, r.accuracy, r.private_accuracy)
                for r in rows if r.submission_id == sub_id]
        status = derive_status([r.status for r in runs])
        done = status == RunStatus.succeeded
        before = rescore.before.get(str(sub_id), {})
        entries.append(Entry(
            submission_id=sub_id, team_id=teams[sub_id], team=names[teams[sub_id]], status=status,
            before_accuracy=before.get("accuracy"), before_private_accuracy=before.get("private_accuracy"),
            after_accuracy=_mean([r.accuracy for r in runs]) if done else None,
            after_private_accuracy=_mean([r.private_accuracy for r in runs]) if done else None, runs=runs))
    over = all(r.status in TERMINAL for r in rows)
    return Report(
        id=rescore.id, competition=comp.slug, round=rescore.round, seeds=rescore.seeds,
        threshold=rescore.threshold, submission_ids=rescore.submission_ids, created_at=rescore.created_at,
        created_by_id=rescore.created_by_id, status="done" if over else "running", entries=entries,
        failed=[e.submission_id for e in entries if over and e.status != RunStatus.succeeded],
        public=kendall_tau({e.submission_id: (e.before_accuracy, e.after_accuracy) for e in entries},
                           rescore.threshold) if over else None,
        private=kendall_tau({e.submission_id: (e.before_private_accuracy, e.after_private_accuracy)
                             for e in entries}, rescore.threshold) if over else None)


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def kendall_tau(scores: dict[int, tuple[float | None, float | None]], threshold: float) -> Tau:
    """Kendall tau between the (before, after) scores of the entries with both, over the pairs whose scores
    before differ by more than `threshold` (see the module's docstring)."""
    scored = [(b, a) for b, a in scores.values() if b is not None and a is not None]
    concordant = discordant = tied = close = 0
    for (b1, a1), (b2, a2) in itertools.combinations(scored, 2):
        if abs(b1 - b2) <= threshold:
            close += 1
        elif a1 == a2:
            tied += 1
        elif (a1 > a2) == (b1 > b2):
            concordant += 1
        else:
            discordant += 1
    counted = concordant + discordant
    return Tau(tau=(concordant - discordant) / counted if counted else None, pairs=counted + tied,
               concordant=concordant, discordant=discordant, tied_after=tied, within_threshold=close)
