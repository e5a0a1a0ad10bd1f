"""Ensemble entries: 2 to 5 of a team's succeeded submissions, scored together from their stored test logits.

No training and no device time: the server averages the members' softmax probabilities, image by image,
and scores the average on the public and the private half of the test set as a run would be scored. With
k seeds, the members' runs of their scoring round are matched by seed position (each member's runs sorted
by seed: members never rescored share the competition's seeds), which gives k ensemble runs and so a mean
and std like any entry.

An ensemble is a submission like any other (it counts against the quota, ranks on the board) whose runs
are written here, succeeded, instead of by a worker: charged nothing, their gpu_seconds the members' (what
produced the predictions). Their logits are stored as log(average probability), with their per-image
correctness, so that rank bands compare an ensemble like any entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth.models import User
from app.competitions.models import Competition, Membership, Team
from app.db import utcnow
from app.errors import Conflict, InvalidField
from app.submissions.models import Run, RunLogits, RunStatus, Submission, SubmissionKind, TestLabels
from app.submissions.service import check_open, check_quota, lock_team, refresh_submission
from worker.engine.split import public_private_indices

MIN_MEMBERS, MAX_MEMBERS = 2, 5
ECE_BINS = 15  # worker.engine.evaluate.ece's default, so an ensemble's ECE compares with its members'


@dataclass(frozen=True)
class Scores:
    """One seed position's ensemble, scored on each half of the test set (None for an empty half)."""

    accuracy: float | None
    private_accuracy: float | None
    ece: float | None
    private_ece: float | None
    log_probs: np.ndarray  # (rows, classes) fp16: log of the averaged probabilities, stored as its logits
    correct: np.ndarray  # (rows,) bool: argmax of the averaged probabilities == label


def score(member_logits: list[np.ndarray], labels: np.ndarray) -> Scores:
    """Average the members' softmax probabilities (each (rows, classes) logits, any float dtype) and score
    the average against `labels` on the public and the private half (worker.engine.split)."""
    probs = np.mean([_softmax(x) for x in member_logits], axis=0)
    correct = probs.argmax(1) == labels
    public, private = (np.asarray(half, dtype=np.int64) for half in public_private_indices(len(labels)))
    log_probs = np.log(np.maximum(probs, np.finfo(np.float64).tiny)).astype(np.float16)
    return Scores(accuracy=_accuracy(correct[public]), private_accuracy=_accuracy(correct[private]),
                  ece=ece(probs[public], correct[public]), private_ece=ece(probs[private], correct[private]),
                  log_probs=log_probs, correct=correct)


def _softmax(logits: np.ndarray) -> np.ndarray:
    # fp16 logits past its range are stored as +-inf: clamp them to its largest finite values first.
    z = np.nan_to_num(logits.astype(np.float64), nan=0.0, posinf=65504.0, neginf=-65504.0)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _accuracy(correct: np.ndarray) -> float | None:
    return float(correct.mean()) if correct.size else None


def ece(probs: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of probabilities (rows, classes): worker.engine.evaluate.ece's definition
    (equal-width, right-closed max-probability bins) in numpy, for the API does not load torch."""
    if not correct.size:
        return None
    conf = probs.max(axis=1)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / correct.size)


# ----------------------------------------------------------------------------------------------------
# The entry
# ----------------------------------------------------------------------------------------------------


def create_ensemble(session: Session, comp: Competition, member: Membership, user: User,
                    member_ids: list[int]) -> Submission:
    """Score the ensemble of `member_ids` (distinct, MIN_MEMBERS..MAX_MEMBERS: the request's schema checks)
    and store it as a succeeded submission of the caller's team. InvalidField on `members` names each
    member that can't be one and why; nothing is stored then."""
    members = _members(session, comp, member.team_id, member_ids)
    positions = _positions(members)
    labels = _labels(session, comp)
    logits = _logits(session, members, positions, labels)
    lock_team(session, member.team_id)
    now = utcnow()
    check_open(comp, now)
    check_quota(session, comp, member.team_id, now)

    sub = Submission(competition_id=comp.id, team_id=member.team_id, user_id=user.id,
                     config={"ensemble_of": member_ids}, kind=SubmissionKind.ensemble, members=member_ids,
                     status=RunStatus.queued, created_at=now, predicted_seconds=0.0)
    session.add(sub)
    session.flush()
    session.execute(update(Team).where(Team.id == member.team_id).values(submissions=Team.submissions + 1))
    for runs in positions:
        s = score([logits[r.id] for r in runs], labels)
        first = runs[0]
        mismatch = "; ".join(f"member run {r.id}: {r.device_mismatch}" for r in runs if r.device_mismatch)
        run = Run(submission_id=sub.id, seed=first.seed, spec=first.spec.model_copy(deep=True),
                  spec_hash=hashlib.sha256(f"ensemble:{','.join(str(r.id) for r in runs)}".encode()).hexdigest(),
                  queue=first.queue, status=RunStatus.succeeded, round=0, attempts=0, progress=1.0,
                  started_at=now, finished_at=now, accuracy=s.accuracy, private_accuracy=s.private_accuracy,
                  ece=s.ece, private_ece=s.private_ece, gpu_seconds=sum(r.gpu_seconds or 0.0 for r in runs),
                  charged_seconds=0.0, predicted_seconds=0.0, device_mismatch=mismatch or None, result=None)
        session.add(run)
        session.flush()
        session.add(RunLogits(run_id=run.id, rows=s.log_probs.shape[0], cols=s.log_probs.shape[1],
                              dtype="float16", data=s.log_probs.tobytes(), correct=np.packbits(s.correct).tobytes()))
    refresh_submission(session, sub.id)
    return sub


def _invalid(problems: dict[int, str], eligible: Sequence[int] = (), why: str = "") -> InvalidField:
    """A 422 on `members` naming every member that can't be one, and why; `eligible`, the caller's own
    submissions that could be, when that is the question."""
    detail = "; ".join(f"submission {i} {what}" for i, what in problems.items()) + (f": {why}" if why else "")
    return InvalidField("members", sorted(problems), detail, [str(i) for i in eligible])


def _members(session: Session, comp: Competition, team_id: int, member_ids: list[int]) -> list[Submission]:
    """The member submissions, in the order given, each checked: the caller's team's, in this competition, a
    trained (not an ensemble, not a baseline) submission that succeeded."""
    found = {s.id: s for s in session.scalars(select(Submission).where(
        Submission.id.in_(member_ids), Submission.competition_id == comp.id, Submission.team_id == team_id))}
    problems: dict[int, str] = {}
    for i in member_ids:
        sub = found.get(i)
        if sub is None:  # another team's and one that does not exist read alike: existence is not told
            problems[i] = "is not one of your team's submissions in this competition"
        elif sub.is_baseline:
            problems[i] = "is a baseline, not an entry"
        elif sub.kind != SubmissionKind.train:
            problems[i] = "is an ensemble; members must be trained submissions"
        elif sub.status != RunStatus.succeeded:
            problems[i] = f"is {sub.status}; only succeeded submissions can be members"
    if problems:
        raise _invalid(problems, _eligible(session, comp, team_id))
    return [found[i] for i in member_ids]


def _eligible(session: Session, comp: Competition, team_id: int) -> list[int]:
    return list(session.scalars(select(Submission.id).where(
        Submission.competition_id == comp.id, Submission.team_id == team_id,
        Submission.status == RunStatus.succeeded, Submission.kind == SubmissionKind.train,
        Submission.is_baseline.is_(False)).order_by(Submission.id)))


def _positions(members: list[Submission]) -> list[list[Run]]:
    """Seed position -> each member's run there (members in the order given): the runs of each member's
    scoring round, sorted by seed. Members scored over different numbers of seeds can't be matched."""
    scoring = [sorted((r for r in m.runs if r.round == m.round), key=lambda r: r.seed) for m in members]
    counts = {m.id: len(runs) for m, runs in zip(members, scoring, strict=True)}
    if len(set(counts.values())) != 1:
        raise _invalid({i: f"was scored over {k} seed(s)" for i, k in counts.items()},
                       why="members are matched seed by seed, so they must have as many seeds")
    not_done = {m.id: "has a run of its scoring round that did not succeed"
                for m, runs in zip(members, scoring, strict=True)
                if not runs or any(r.status != RunStatus.succeeded for r in runs)}
    if not_done:
        raise _invalid(not_done)
    return [list(runs) for runs in zip(*scoring, strict=True)]


def _labels(session: Session, comp: Competition) -> np.ndarray:
    stored = session.get(TestLabels, comp.id)
    if stored is None:
        raise Conflict(f"competition {comp.slug!r} has no stored test labels yet (they are kept by the first run "
                       "that succeeds on this version of the server): no ensemble can be scored until one does")
    return np.frombuffer(stored.data, dtype=np.uint8).astype(np.int64)


def _logits(session: Session, members: list[Submission], positions: list[list[Run]],
            labels: np.ndarray) -> dict[int, np.ndarray]:
    """Run id -> its stored logits (rows, classes), for every run matched; each member's must cover the
    stored test set with the same classes."""
    of_member = {r.id: r.submission_id for runs in positions for r in runs}
    rows = {lg.run_id: lg for lg in session.scalars(select(RunLogits).where(RunLogits.run_id.in_(of_member)))}
    cols = {lg.cols for lg in rows.values()}
    problems: dict[int, str] = {}
    for run_id, sub_id in of_member.items():
        lg = rows.get(run_id)
        if lg is None:
            problems.setdefault(sub_id, f"has no stored test logits (run {run_id})")
        elif lg.rows != len(labels):
            problems.setdefault(sub_id, f"has logits for {lg.rows} test images (run {run_id}); the competition's "
                                        f"test set has {len(labels)}")
        elif len(cols) > 1:
            problems.setdefault(sub_id, f"has logits over {lg.cols} classes (run {run_id}); the members disagree "
                                        "on the number of classes")
    if problems:
        raise _invalid(problems)
    return {run_id: np.frombuffer(lg.data, dtype=np.dtype(lg.dtype)).reshape(lg.rows, lg.cols)
            for run_id, lg in rows.items()}
