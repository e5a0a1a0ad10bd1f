"""The boards people see: scores with their uncertainty, rank bands, the Pareto front, the public board
(live, or frozen after `freeze_at`), the private board after the deadline, baselines, and who may see what.

Computing a board means a paired bootstrap over every entry (app.leaderboard.bands), seconds for a thousand
teams, so it is done once per change and kept in `board_cache` (leaderboard.models.BoardCache):
- `bump` marks a competition's boards stale, in the transaction that changes what they show (a submission's
  status or scores: leaderboard.service.note_submission; a final mark; a rule).
- `refresh` recomputes every board of a competition and stores them, claiming the work first
  (`refreshing_since`) so that two processes don't compute the same boards at once.
- `refresh_stale` refreshes every stale competition; each worker's parent process polls it every
  `board_refresh_seconds` (worker.celery_app), so a landed result is ranked within seconds, off the GPU's
  time, and a burst of results costs one refresh, not one each.
- `cached` serves the stored payload, parsed once per process. A request that finds it stale while nobody
  is refreshing it refreshes it; while another refresh is under way it serves the previous payload, marked
  `stale`.

What the payload holds is everything, private numbers and configs included; `view` cuts it down to what
the viewer may see (phase, role, team) on every read, so the cache itself never depends on who asks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from datetime import datetime, timedelta
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np
from sqlalchemy import case, event, func, or_, select, update
from sqlalchemy.orm import Session

from app.auth.models import User
from app.competitions.models import Competition, Membership, Team
from app.config import get_settings
from app.db import session_scope, upsert_insert, utcnow
from app.errors import Forbidden
from app.hardware import hours_unit
from app.leaderboard import bands
from app.leaderboard.models import BoardCache, TeamBest
from app.leaderboard.schemas import Board
from app.leaderboard.service import best_per_team, final_entries
from app.submissions.models import Run, RunLogits, RunStatus, Submission, TestLabels
from worker.engine.split import public_private_indices

log = logging.getLogger("hparena.board")

REFRESH_CLAIM = timedelta(seconds=60)  # a refresh older than this is presumed dead: another may start
PRIVATE_FIELDS = ("private_accuracy", "private_accuracy_std", "private_seed_scores", "private_ece")


# ----------------------------------------------------------------------------------------------------
# Staleness and refresh
# ----------------------------------------------------------------------------------------------------


def bump(session: Session, competition_id: int) -> None:
    """What the boards show changed in this transaction: they are stale from its commit on. The version is
    written just before the commit (_write_bumps), so the competition's board_cache row is locked only for the
    commit itself, after every other lock the transaction took: claims and results of one competition don't
    queue behind one another on it, and no lock order can cycle through it."""
    session.info.setdefault(_BUMPS, set()).add(competition_id)


_BUMPS = "hparena.board_bumps"


@event.listens_for(Session, "before_commit")
def _write_bumps(session: Session) -> None:
    ids = session.info.pop(_BUMPS, None)
    if not ids:
        return
    now = utcnow()
    for competition_id in sorted(ids):
        ins = upsert_insert(session.get_bind(), BoardCache).values(competition_id=competition_id, version=1,
                                                                   stale_since=now)
        session.execute(ins.on_conflict_do_update(index_elements=["competition_id"], set_={
            "version": BoardCache.version + 1, "stale_since": func.coalesce(BoardCache.stale_since, now)}))


@event.listens_for(Session, "after_rollback")
def _drop_bumps(session: Session) -> None:
    session.info.pop(_BUMPS, None)


def refresh(competition_id: int, *, force: bool = False) -> dict[str, Any] | None:
    """Recompute and store a competition's boards, in transactions of its own. Returns the payload, or None
    when another refresh is under way (and `force` is not set) or the cache is already fresh."""
    now = utcnow()
    c = BoardCache
    with session_scope() as session:
        session.execute(upsert_insert(session.get_bind(), c).values(competition_id=competition_id, version=0)
                        .on_conflict_do_nothing())
        claim = update(c).where(c.competition_id == competition_id)
        if not force:
            claim = claim.where(or_(c.computed_version.is_(None), c.computed_version < c.version),
                                or_(c.refreshing_since.is_(None), c.refreshing_since < now - REFRESH_CLAIM))
        if session.execute(claim.values(refreshing_since=now).execution_options(synchronize_session=False)
                           ).rowcount == 0:
            return None
    try:
        with session_scope() as session:
            # The version read before computing: a change committed meanwhile bumps past it, so the boards
            # stay stale (and are refreshed again) rather than pass for ones that include it.
            version = session.scalar(select(c.version).where(c.competition_id == competition_id))
            comp = session.get(Competition, competition_id)
            if comp is None:
                return None
            payload = compute(session, comp)
            # Never over a newer payload (a refresh whose claim expired while it computed).
            session.execute(update(c).where(c.competition_id == competition_id, or_(
                c.computed_version.is_(None), c.computed_version <= version)).values(
                payload=payload, computed_version=version, computed_at=utcnow(), refreshing_since=None,
                stale_since=case((c.version == version, None), else_=utcnow())))
        return payload
    except Exception:
        with session_scope() as session:  # let the next reader try at once instead of after the claim expires
            session.execute(update(c).where(c.competition_id == competition_id).values(refreshing_since=None))
        raise


def _stale(c: type[BoardCache] = BoardCache):
    return or_(c.computed_version.is_(None), c.computed_version < c.version)


def refresh_stale() -> list[int]:
    """Refresh every competition whose boards are stale and that nobody is refreshing (the workers' poll)."""
    c = BoardCache
    with session_scope() as session:
        stale = list(session.scalars(select(c.competition_id).where(
            _stale(), or_(c.refreshing_since.is_(None), c.refreshing_since < utcnow() - REFRESH_CLAIM))))
    return [competition_id for competition_id in stale if refresh(competition_id) is not None]


# Each process keeps the last payload it parsed per competition, keyed by when it was computed: a request
# reads two integers and two timestamps instead of parsing megabytes of JSON for a thousand teams.
_PARSED: dict[int, tuple[datetime, dict[str, Any]]] = {}


def cached(session: Session, comp: Competition) -> tuple[dict[str, Any], bool]:
    """(payload, stale): the stored boards. Stale ones are served as they are (marked stale) while a refresh
    is under way or the change is younger than the grace (a worker will refresh them within seconds); past
    it, or with nothing stored yet, this request refreshes them itself (no worker is running)."""
    c = BoardCache
    row = session.execute(select(c.version, c.computed_version, c.computed_at, c.refreshing_since, c.stale_since)
                          .where(c.competition_id == comp.id)).first()
    now = utcnow()
    if row is not None and row.computed_at is not None:
        fresh = row.computed_version == row.version
        busy = row.refreshing_since is not None and row.refreshing_since >= now - REFRESH_CLAIM
        grace = timedelta(seconds=get_settings().board_stale_grace_seconds)
        recent = row.stale_since is not None and row.stale_since > now - grace
        if fresh or busy or recent:
            return _payload(session, comp.id, row.computed_at), not fresh
    payload = refresh(comp.id)
    if payload is not None:
        return payload, False
    # Refreshed or claimed by another between our read and our claim: serve what is stored now.
    row = session.execute(select(c.computed_at, c.version, c.computed_version).where(c.competition_id == comp.id)
                          ).first()
    if row is not None and row.computed_at is not None:
        return _payload(session, comp.id, row.computed_at), row.computed_version != row.version
    return compute(session, comp), False  # a first refresh is under way elsewhere: compute without storing


def _payload(session: Session, competition_id: int, computed_at: datetime) -> dict[str, Any]:
    memo = _PARSED.get(competition_id)
    if memo is not None and memo[0] == computed_at:
        return memo[1]
    payload = session.scalar(select(BoardCache.payload).where(BoardCache.competition_id == competition_id,
                                                              BoardCache.computed_at == computed_at))
    if payload is None:  # refreshed again meanwhile: take the newest
        computed_at, payload = session.execute(select(BoardCache.computed_at, BoardCache.payload).where(
            BoardCache.competition_id == competition_id)).one()
    _PARSED[competition_id] = (computed_at, payload)
    return payload


# ----------------------------------------------------------------------------------------------------
# Computing the boards
# ----------------------------------------------------------------------------------------------------


def compute(session: Session, comp: Competition) -> dict[str, Any]:
    """Every board of `comp`, with everything in it (private numbers, configs): `view` filters per reader."""
    labels_rows = session.scalar(select(TestLabels.rows).where(TestLabels.competition_id == comp.id))
    public = _rows(session, comp, select(TeamBest.submission_id).where(TeamBest.competition_id == comp.id))
    frozen = None
    if comp.freeze_at is not None:
        best = best_per_team(Submission.competition_id == comp.id, Submission.finished_at <= comp.freeze_at
                             ).subquery()
        frozen = _rows(session, comp, select(best.c.submission_id))
    finals = final_entries(comp).subquery()
    private = _rows(session, comp, select(finals.c.submission_id))
    baselines = _rows(session, comp, select(Submission.id).where(
        Submission.competition_id == comp.id, Submission.is_baseline, Submission.status == RunStatus.succeeded))
    frozen_baselines = [b for b in baselines if comp.freeze_at and b["finished_at"] <= comp.freeze_at.isoformat()]
    configs = {}  # each submission's config once, not once per board it is on
    for e in (*public, *(frozen or ()), *private, *baselines):
        configs[str(e["submission_id"])] = e.pop("config")
    return {
        "computed_at": utcnow().isoformat(),
        "configs": configs,
        "public": _board(public, baselines, "public", labels_rows),
        "frozen": None if frozen is None else _board(frozen, frozen_baselines, "public", labels_rows),
        "private": _board(_best_private(private), baselines, "private", labels_rows),
    }


def _best_private(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of each team's final entries, the one with the best private accuracy (then public, then the earlier)."""
    best: dict[int, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (-(r["private_accuracy"] or 0.0), -(r["accuracy"] or 0.0),
                                         r["submission_id"])):
        best.setdefault(r["team_id"], r)
    return list(best.values())


def _rows(session: Session, comp: Competition, ids) -> list[dict[str, Any]]:
    """One row per submission in `ids` (a select of submission ids), with its scoring round's per-seed scores
    and its per-image correctness (bytes, popped before storing)."""
    s = Submission
    subs = session.execute(
        select(s.id, s.team_id, Team.name.label("team"), Team.submissions, s.kind, s.members, s.is_baseline,
               s.final, s.accuracy, s.accuracy_std, s.ece, s.private_accuracy, s.private_accuracy_std,
               s.private_ece, s.gpu_seconds, s.created_at, s.finished_at, s.device_mismatch, s.config, s.round)
        .join(Team, Team.id == s.team_id).where(s.id.in_(ids), s.status == RunStatus.succeeded)).all()
    if not subs:
        return []
    runs = _scoring_runs(session, [x.id for x in subs])
    out = []
    for x in subs:
        mine = runs.get(x.id, [])
        x = SimpleNamespace(**{**x._asdict(), **{k: _finite(getattr(x, k)) for k in _SCORES}})
        out.append({
            "submission_id": x.id, "team_id": x.team_id, "team": x.team, "submissions": x.submissions,
            "kind": "baseline" if x.is_baseline else x.kind, "members": x.members, "baseline": x.is_baseline,
            "final": x.final, "accuracy": x.accuracy, "accuracy_std": x.accuracy_std, "ece": x.ece,
            "seed_scores": [{"seed": r.seed, "accuracy": _finite(r.accuracy)} for r in mine],
            "private_accuracy": x.private_accuracy, "private_accuracy_std": x.private_accuracy_std,
            "private_ece": x.private_ece,
            "private_seed_scores": [{"seed": r.seed, "accuracy": _finite(r.private_accuracy)} for r in mine],
            "gpu_hours": None if x.gpu_seconds is None else x.gpu_seconds / 3600,
            "best_at": x.created_at.isoformat(), "finished_at": x.finished_at.isoformat() if x.finished_at else "",
            "device_mismatch": x.device_mismatch, "config": x.config,
            "_correct": _per_image(mine),
        })
    return out


def _scoring_runs(session: Session, submission_ids: list[int]) -> dict[int, list[Any]]:
    """Each submission's succeeded runs of its scoring round, in seed order, with their per-seed scores and
    per-image correctness (RunLogits.correct and .rows, None for a run stored without them)."""
    runs: dict[int, list[Any]] = {}
    for r in session.execute(
            select(Run.submission_id, Run.seed, Run.accuracy, Run.private_accuracy, RunLogits.correct, RunLogits.rows)
            .join(Submission, Submission.id == Run.submission_id)
            .outerjoin(RunLogits, RunLogits.run_id == Run.id)
            .where(Run.submission_id.in_(submission_ids), Run.round == Submission.round,
                   Run.status == RunStatus.succeeded)
            .order_by(Run.submission_id, Run.seed)):
        runs.setdefault(r.submission_id, []).append(r)
    return runs


def _per_image(runs: list[Any]) -> list[tuple[bytes, int]] | None:
    """A submission's runs as (packed correctness, test rows) pairs for _matrix; None unless every run has them."""
    return [(r.correct, r.rows) for r in runs] if runs and all(r.correct for r in runs) else None


def public_correct(session: Session, comp: Competition, submission_ids: list[int]) -> list[np.ndarray | None]:
    """Per submission (in the given order), the (seeds x public images) correctness matrix the public board's
    rank bands are computed from, or None where a run has no per-image data (stored before migration 0008).
    The public half only: nothing of the private half's images comes out."""
    labels_rows = session.scalar(select(TestLabels.rows).where(TestLabels.competition_id == comp.id))
    runs = _scoring_runs(session, submission_ids)
    return [_matrix(_per_image(runs.get(i, [])), "public", labels_rows) for i in submission_ids]


_SCORES = ("accuracy", "accuracy_std", "ece", "private_accuracy", "private_accuracy_std", "private_ece", "gpu_seconds")


def _finite(x: float | None) -> float | None:
    """A score as JSON can hold it: NaN (the engine's ECE of an empty half) and infinities are unknown."""
    return x if x is None or math.isfinite(x) else None


def _board(entries: list[dict[str, Any]], baselines: list[dict[str, Any]], half: str,
           test_rows: int | None) -> dict[str, Any]:
    """Rank `entries` by their `half`'s accuracy with bands, flag the Pareto front, and place the baselines
    (unranked) where their score falls."""
    score = "accuracy" if half == "public" else "private_accuracy"
    entries = [e for e in entries if e[score] is not None]  # a score the engine did not report ranks nowhere
    means = np.array([e[score] for e in entries], dtype=np.float64)
    correct = [_matrix(e.pop("_correct"), half, test_rows) for e in entries]
    result = bands.band_ranks(means, correct)
    front = bands.pareto_front([e[score] for e in entries], [e["gpu_hours"] for e in entries])
    for e, rank, tie, on_front in zip(entries, result.rank, result.tie, front, strict=True):
        e.update(rank=int(rank), tie=bool(tie), pareto=bool(on_front))
    entries.sort(key=lambda e: (e["rank"], -e[score], e["gpu_hours"] if e["gpu_hours"] is not None else
                                float("inf"), e["best_at"], e["submission_id"]))
    baselines = [dict(b, rank=None, tie=False, pareto=False) for b in baselines]  # shared by every board
    for b in baselines:
        b.pop("_correct", None)
    rows = list(entries)
    for b in sorted(baselines, key=lambda b: -(b[score] or 0.0)):
        at = next((i for i, e in enumerate(rows) if e["rank"] is not None and (e[score] or 0.0) < (b[score] or 0.0)),
                  len(rows))
        rows.insert(at, b)
    for i, e in enumerate(rows, 1):
        e["position"] = i
    m = result.method
    return {"half": half, "entries": rows, "bands": {
        "test": m.test, "alpha": m.alpha, "resamples": m.resamples, "seed": m.seed,
        "available": all(c is not None for c in correct)}}


def _matrix(correct: list[tuple[bytes, int]] | None, half: str, test_rows: int | None) -> np.ndarray | None:
    """A (seeds x images of the half) bool matrix from each run's packed correctness, or None without data."""
    if not correct or any(rows != (test_rows or correct[0][1]) for _, rows in correct):
        return None
    return bands.seed_matrix([bits for bits, _ in correct], correct[0][1], _half(correct[0][1], half))


@lru_cache(maxsize=8)
def _half(rows: int, half: str) -> np.ndarray:
    public, private = public_private_indices(rows)
    return np.asarray(public if half == "public" else private, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# Who sees what
# ----------------------------------------------------------------------------------------------------


def phase(comp: Competition, now: datetime | None = None) -> str:
    """open, frozen (from freeze_at) or closed (after the deadline)."""
    now = now or utcnow()
    if comp.deadline is not None and now > comp.deadline:
        return "closed"
    if comp.freeze_at is not None and now >= comp.freeze_at:
        return "frozen"
    return "open"


def viewer_team(session: Session, comp: Competition, user: User | None) -> int | None:
    if user is None:
        return None
    return session.scalar(select(Membership.team_id).where(Membership.user_id == user.id,
                                                           Membership.competition_id == comp.id))


def view(payload: dict[str, Any], comp: Competition, *, board: str, manager: bool, team_id: int | None,
         now: datetime | None = None) -> dict[str, Any]:
    """The board `board` ("public" or "private") as this reader may see it. The caller has checked that the
    reader may see the private board at all (after close, or a manager)."""
    p = phase(comp, now)
    private_ok = manager or p == "closed"
    configs_ok = manager or p == "closed" and comp.reveal_configs
    frozen = board == "public" and p == "frozen" and payload.get("frozen") is not None and not manager
    data = payload["frozen"] if frozen else payload[board]
    rows = [dict(e) for e in data["entries"]]
    if frozen and team_id is not None:
        live = next((e for e in payload["public"]["entries"] if e["team_id"] == team_id), None)
        mine = next((e for e in rows if e["team_id"] == team_id), None)
        if live is not None and (mine is None or _scores(live) != _scores(mine)):
            own = dict(live, rank=None, tie=False, pareto=False, live=True)
            at = next((i for i, e in enumerate(rows) if (e["accuracy"] or 0.0) < (own["accuracy"] or 0.0)),
                      len(rows))
            rows.insert(at, own)
    for i, e in enumerate(rows, 1):
        e["position"] = i  # a team's own live row, inserted above, moves the rows below it down
        e.setdefault("live", False)
        if not private_ok:
            for f in PRIVATE_FIELDS:
                e[f] = None
        shown = configs_ok or team_id is not None and e["team_id"] == team_id
        e["config"] = payload["configs"].get(str(e["submission_id"])) if shown else None
        e.pop("finished_at", None)
    return {"board": board, "phase": p, "frozen": frozen, "entries": rows, "bands": data["bands"],
            "computed_at": payload["computed_at"]}


def _scores(e: dict[str, Any]) -> tuple:
    return e["submission_id"], e["accuracy"], e["accuracy_std"]


def efficiency(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """The Pareto front of accuracy against GPU-hours, cheapest first: the "efficiency" board."""
    front = [e for e in rows if e["pareto"]]
    return sorted(front, key=lambda e: (e["gpu_hours"], -(e[score] or 0.0)))


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

_SCALAR = ("position", "rank", "tie", "team", "team_id", "submission_id", "kind", "baseline", "final", "live",
           "accuracy", "accuracy_std", "ece", "gpu_hours", "submissions", "best_at", "pareto", "device_mismatch")
_PRIVATE_SCALAR = ("private_accuracy", "private_accuracy_std", "private_ece")
_TYPES = {"position": int, "rank": int, "team_id": int, "submission_id": int, "submissions": int,
          "tie": bool, "baseline": bool, "final": bool, "live": bool, "pareto": bool, "device_mismatch": bool,
          "accuracy": float, "accuracy_std": float, "ece": float, "gpu_hours": float,
          "private_accuracy": float, "private_accuracy_std": float, "private_ece": float}


def export_rows(entries: list[dict[str, Any]], private: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, flat rows): per-seed scores as seed{i} / seed{i}_accuracy (/ seed{i}_private_accuracy),
    the config as JSON text. The same rows make the CSV and the JSON export."""
    k = max((len(e["seed_scores"]) for e in entries), default=0)
    columns = list(_SCALAR) + (list(_PRIVATE_SCALAR) if private else [])
    for i in range(1, k + 1):
        columns += [f"seed{i}", f"seed{i}_accuracy"] + ([f"seed{i}_private_accuracy"] if private else [])
    columns.append("config")
    out = []
    for e in entries:
        row = {c: e.get(c) for c in _SCALAR}
        if private:
            row.update({c: e.get(c) for c in _PRIVATE_SCALAR})
        for i in range(k):
            s = e["seed_scores"][i] if i < len(e["seed_scores"]) else None
            row[f"seed{i + 1}"] = s and s["seed"]
            row[f"seed{i + 1}_accuracy"] = s and s["accuracy"]
            if private:
                ps = e["private_seed_scores"][i] if i < len(e["private_seed_scores"] or []) else None
                row[f"seed{i + 1}_private_accuracy"] = ps and ps["accuracy"]
        row["config"] = None if e.get("config") is None else json.dumps(e["config"], sort_keys=True)
        out.append(row)
    return columns, out


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r[c] is None else (str(r[c]).lower() if isinstance(r[c], bool) else r[c])
                    for c in columns})
    return buf.getvalue()


def from_csv(text: str) -> list[dict[str, Any]]:
    """The export's CSV read back with its columns' types (the inverse of to_csv, for clients and tests)."""
    def cast(column: str, value: str) -> Any:
        if value == "":
            return None
        t = _TYPES.get(column) or (int if column.startswith("seed") and column[4:].isdigit() else
                                   float if column.startswith("seed") else str)
        return value == "true" if t is bool else t(value)
    return [{c: cast(c, v) for c, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def read(session: Session, comp: Competition, *, manager: bool, team_id: int | None, name: str,
         view_name: str | None) -> Board:
    """Board `name` of `comp` as a reader (a manager of it or not, a member of team `team_id` or none) may see
    it: what GET /api/competitions/{slug}/leaderboard answers, and what the pages show."""
    if name == "private" and not manager and phase(comp) != "closed":
        deadline = comp.deadline.isoformat() if comp.deadline else "the deadline the organizer sets"
        raise Forbidden(f"the private board is revealed at the close of the competition ({deadline})")
    payload, stale = cached(session, comp)
    seen = view(payload, comp, board=name, manager=manager, team_id=team_id)
    view_name = view_name or comp.board_view
    entries = seen["entries"]
    if view_name == "efficiency":
        entries = efficiency(entries, "accuracy" if name == "public" else "private_accuracy")
    return Board(competition=comp.slug, title=comp.title, hardware_class=comp.hardware_class,
                 cost_unit=hours_unit(session, comp.hardware_class), board=name, view=view_name,
                 phase=seen["phase"], frozen=seen["frozen"], freeze_at=comp.freeze_at, deadline=comp.deadline,
                 bands=seen["bands"], computed_at=seen["computed_at"], stale=stale, entries=entries)
