"""Insights into a competition's results: accuracy against GPU-hours with the Pareto front, accuracy against
each hyperparameter that varies, and each hyperparameter's importance. No HTTP here.

What it is computed from: every succeeded training submission of the competition (not the baselines, which
are the organizers' reference lines, and not ensembles, whose config is a list of members rather than
hyperparameters), scored by its public accuracy (the mean over its seeds). Only the public half is used, so
nothing here can leak a private number, before the close or after.

Importance is Optuna's, not ours: each submission becomes a finished trial (optuna.trial.create_trial) whose
params are its config's values of the hyperparameters that vary among the entries, with distributions built
from the competition's search space where it restricts one (a {min, max} range is a float or int distribution,
a {choices} list a categorical one), else from the values seen (numbers) or the engine's own options (choices).
A hyperparameter fixed by the space, or one no entry varies, is not a param. The trials go into an
in-memory study, and optuna.importance.get_param_importances ranks them with the PED-ANOVA evaluator.

Why PED-ANOVA, with target_quantile=0.25, and not fANOVA. On synthetic studies of 30 trials (lr log-uniform
in [1e-3, 1], batch_size in {32, 64, 100}, weight_decay in [0, 0.01]; accuracy depending on lr alone, plus
Gaussian noise), 20 studies per case:
- both put lr first in 20/20 studies with noise 0.01 and 0.03, whether accuracy peaks in lr or rises with it;
- with noise 0.05 around a peak, PED-ANOVA's default target_quantile (0.1: the best 3 of 30 trials) put lr
  first in 17/20; with 0.25 (the best 7 or 8) in 20/20, giving lr a median share of 0.90 (never under
  0.78), against fANOVA's 20/20 with a median of 0.66 (down to 0.46);
- PED-ANOVA took ~0.01-0.02 s a study, fANOVA ~0.4-0.7 s (a random forest), and fANOVA needs scikit-learn
  and SciPy, which nothing else in the app uses.
PED-ANOVA has no randomness (kernel density estimates on the given trials), so the page is deterministic
without a seed. Below MIN_TRIALS (10) succeeded submissions neither evaluator found lr reliably (about 3
studies in 4 at 10 trials), so no importance is shown.

No signal. PED-ANOVA ranks whatever it is given: entries whose accuracies differ only by test-set noise (all
at chance, or all within a few images of each other) still get confident-looking shares. So before ranking,
the entries go through the board's own test, app.leaderboard.bands.band_ranks on the public half's per-image
correctness (app.leaderboard.board.public_correct: the same matrices, the same paired bootstrap, alpha and
seed as the public board's rank bands), here over every entry rather than each team's best. When it puts
every entry at rank 1, no submission is significantly better than any other: there is no difference for a
hyperparameter to explain, so no importance is computed and the page says so. This is the board's test
as the board runs it, one-sided per pair at ALPHA with no correction for the many pairs, so among many
entries a chance difference somewhere is likely: "no signal" is claimed only when entries really are
indistinguishable, and otherwise the ranking is shown as before. It is claimed only when every entry has
per-image data (runs stored before migration 0008 have none): with some missing, nothing is claimed and the
ranking is shown, as the board then ranks those entries by their means alone without a band. A fallback on
accuracies alone (say, max - min under two binomial standard errors of the half) was left out: it ignores
the pairing (configs that miss mostly the same images differ far less from resample to resample than two
independent binomials), so it would claim "no signal" where the board's own test tells entries apart.

The analysis is computed once per board version (app.leaderboard.board bumps it in every transaction that
lands a result or changes one) and memoised per process; `view` then cuts it down to what a reader may see.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.models import User
from app.competitions.models import Competition, Team
from app.competitions.service import is_manager
from app.errors import Forbidden, Unauthorized
from app.hardware import hours_unit
from app.leaderboard import bands, board
from app.leaderboard.board import phase
from app.leaderboard.models import BoardCache
from app.submissions.models import RunStatus, Submission, SubmissionKind
from worker.engine.config import NUMERIC, Choices, Range, TrainConfig, effective_space

MIN_TRIALS = 10  # succeeded submissions before importance means anything (see the module docstring)
TARGET_QUANTILE = 0.25  # PED-ANOVA's "good" trials: the best quarter (see the module docstring)
LOG_SPAN = 100.0  # a positive range spanning two decades or more is read on a log scale (lr, weight decay)

_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


# ----------------------------------------------------------------------------------------------------
# What is computed (everything, for organizers) and what a reader sees
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A hyperparameter that varies among the entries, with the scale its chart and its distribution use."""

    name: str
    kind: Literal["numeric", "categorical"]
    log: bool = False
    choices: list[Any] | None = None  # categorical: the search space's choices, in its order


@dataclass(frozen=True)
class Entry:
    """One succeeded submission."""

    submission_id: int
    team: str
    accuracy: float  # public, mean over seeds
    gpu_hours: float | None
    pareto: bool
    values: dict[str, Any]  # its value of each varying hyperparameter (absent: unset or outside the space)


@dataclass(frozen=True)
class Analysis:
    entries: list[Entry]
    params: list[Param]
    importance: dict[str, float] | None  # param -> share (sums to 1), most important first; None: too few,
    # or no signal
    no_signal: bool = False  # rank bands put every entry at rank 1 (see the module docstring)


@dataclass(frozen=True)
class Insights:
    """What one reader sees. Points tie a score to a team only where that reader may see who got it."""

    slug: str
    title: str
    phase: str
    trials: int
    min_trials: int
    hours_unit: str
    pareto: list[dict[str, Any]]  # {x: hours, y: accuracy %, front, team?, submission_id?}
    params: list[dict[str, Any]] | None  # per param: {name, kind, log, labels?, points}; None: configs hidden
    importance: list[tuple[str, float]] | None
    no_signal: bool = False  # no importance: no submission is significantly better than another
    notes: list[str] = field(default_factory=list)

    def chart_data(self) -> dict[str, Any]:
        """What insights.js draws: the same content, JSON only."""
        return {"pareto": self.pareto, "params": self.params or [], "hours_unit": self.hours_unit}


# ----------------------------------------------------------------------------------------------------
# Who may see it
# ----------------------------------------------------------------------------------------------------


def insights(session: Session, comp: Competition, user: User | None) -> Insights:
    """The insights `user` may see: the competition's organizers and admins at any time, everyone after the
    close. Before it, anyone else is Forbidden (Unauthorized when signed out: they may be its organizer)."""
    manager = is_manager(comp, user)
    closed = phase(comp) == "closed"
    if not manager and not closed:
        if user is None:
            raise Unauthorized("sign in: insights are for the competition's organizers until it closes")
        raise Forbidden(f"the insights of {comp.slug!r} are for its organizers until the competition closes")
    return view(analysis(session, comp), comp, manager=manager, closed=closed,
                hours_unit=hours_unit(session, comp.hardware_class))


def view(a: Analysis, comp: Competition, *, manager: bool, closed: bool, hours_unit: str) -> Insights:
    """Cut the analysis down for a reader. Organizers see everything. After the close everyone sees the
    aggregates; configs tied to teams (the per-hyperparameter charts, the team behind each point) only when
    the competition reveals configs (the board's rule: app.leaderboard.board.view)."""
    configs_shown = manager or closed and comp.reveal_configs
    pareto = []
    for e in a.entries:
        if e.gpu_hours is None:
            continue
        p: dict[str, Any] = {"x": e.gpu_hours, "y": e.accuracy * 100, "front": e.pareto}
        if configs_shown:
            p["team"] = e.team
        if manager:
            p["submission_id"] = e.submission_id
        pareto.append(p)
    params = [_param_chart(p, a.entries, manager) for p in a.params] if configs_shown else None
    notes = []
    if a.no_signal:
        notes.append(f"No signal yet: no submission is significantly better than another (rank bands, "
                     f"α = {bands.ALPHA:g}), so no hyperparameter can be credited.")
    elif a.importance is None:
        notes.append(f"Hyperparameter importance needs at least {MIN_TRIALS} succeeded submissions; there "
                     f"{'is' if len(a.entries) == 1 else 'are'} {len(a.entries)} so far.")
    elif not a.params:
        notes.append("No hyperparameter varies among the succeeded submissions.")
    if not configs_shown:
        notes.append("The organizers did not reveal configs: only the aggregate importance and accuracy against "
                     f"{hours_unit} are shown.")
    return Insights(slug=comp.slug, title=comp.title, phase=phase(comp), trials=len(a.entries),
                    min_trials=MIN_TRIALS, hours_unit=hours_unit, pareto=pareto, params=params,
                    importance=None if a.importance is None else list(a.importance.items()),
                    no_signal=a.no_signal, notes=notes)


def _param_chart(p: Param, entries: list[Entry], manager: bool) -> dict[str, Any]:
    points = []
    for e in entries:
        if p.name not in e.values:
            continue
        v = e.values[p.name]
        point = {"x": _label(v) if p.kind == "categorical" else v, "y": e.accuracy * 100, "team": e.team}
        if manager:
            point["submission_id"] = e.submission_id
        points.append(point)
    chart: dict[str, Any] = {"name": p.name, "kind": p.kind, "log": p.log, "points": points}
    if p.kind == "categorical":
        chart["labels"] = [_label(c) for c in p.choices or []]
    return chart


def _label(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


# ----------------------------------------------------------------------------------------------------
# The analysis, once per board version
# ----------------------------------------------------------------------------------------------------

# competition id -> (key, analysis). The key holds the database too (tests, and a process serving two
# databases, see the same ids) and the competition's creation time (an id can be reused after a delete).
_MEMO: dict[int, tuple[tuple[Any, ...], Analysis]] = {}
_MEMO_LOCK = threading.Lock()


def analysis(session: Session, comp: Competition) -> Analysis:
    # The version is read before the data: a result committed in between bumps past it, so at worst a newer
    # analysis is kept under an older key and recomputed at the next request, never the reverse.
    version = session.scalar(select(BoardCache.version).where(BoardCache.competition_id == comp.id))
    # The search space is in the key too: an organizer's PATCH of it changes the distributions at once.
    key = (str(session.get_bind().url), comp.created_at, version, json.dumps(comp.search_space, sort_keys=True))
    with _MEMO_LOCK:
        memo = _MEMO.get(comp.id)
    if memo is not None and memo[0] == key:
        return memo[1]
    result = compute(session, comp)
    with _MEMO_LOCK:
        _MEMO[comp.id] = (key, result)
    return result


def compute(session: Session, comp: Competition) -> Analysis:
    s = Submission
    rows = session.execute(
        select(s.id, Team.name, s.accuracy, s.gpu_seconds, s.config)
        .join(Team, Team.id == s.team_id)
        .where(s.competition_id == comp.id, s.status == RunStatus.succeeded, s.kind == SubmissionKind.train,
               s.is_baseline.is_(False), s.accuracy.is_not(None))
        .order_by(s.id)).all()
    rows = [r for r in rows if math.isfinite(r.accuracy)]
    configs = [r.config or {} for r in rows]
    params, dists = _varying_params(comp, configs)
    values = [{p.name: v for p in params if (v := _point(c.get(p.name), dists[p.name])) is not _NO_POINT}
              for c in configs]
    hours = [None if r.gpu_seconds is None or not math.isfinite(r.gpu_seconds) else r.gpu_seconds / 3600
             for r in rows]
    front = bands.pareto_front([r.accuracy for r in rows], hours)
    entries = [Entry(submission_id=r.id, team=r.name, accuracy=r.accuracy, gpu_hours=h,
                     pareto=on, values=v) for r, h, on, v in zip(rows, hours, front, values, strict=True)]
    importance, no_signal = None, False
    if len(entries) >= MIN_TRIALS:
        no_signal = bool(params) and not separable(session, comp, entries)
        if not no_signal:
            importance = param_importances(dists, [(e.values, e.accuracy) for e in entries]) if params else {}
    return Analysis(entries=entries, params=params, importance=importance, no_signal=no_signal)


def separable(session: Session, comp: Competition, entries: list[Entry]) -> bool:
    """Whether the public board's rank bands, over these entries, find one significantly better than another.
    True (nothing claimed) when any entry has no per-image data: see the module docstring."""
    correct = board.public_correct(session, comp, [e.submission_id for e in entries])
    if any(c is None for c in correct):
        return True
    means = [e.accuracy for e in entries]
    # Usually the best entry is already significantly better than the worst: one pair instead of E^2 / 2.
    top, bottom = max(range(len(means)), key=means.__getitem__), min(range(len(means)), key=means.__getitem__)
    if max(bands.band_ranks([means[top], means[bottom]], [correct[top], correct[bottom]]).rank) > 1:
        return True
    return max(bands.band_ranks(means, correct).rank) > 1


def param_importances(distributions: dict[str, BaseDistribution],
                      scored: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """Optuna's PED-ANOVA importance of each param (higher score is better), from (params, score) pairs.
    Only the params every pair has are ranked: a trial missing one has no place on that axis."""
    names = [n for n in distributions if all(n in v for v, _ in scored)]
    if not names:
        return {}
    trials = [optuna.trial.create_trial(params={n: v[n] for n in names},
                                        distributions={n: distributions[n] for n in names}, value=score)
              for v, score in scored]
    study = optuna.create_study(direction="maximize")  # in memory
    study.add_trials(trials)
    result = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE),
                                   params=names)
    return {name: float(share) for name, share in result.items()}


def _varying_params(comp: Competition, configs: list[dict[str, Any]]
                    ) -> tuple[list[Param], dict[str, BaseDistribution]]:
    """The hyperparameters that take more than one value among `configs` (the search space's first, in its
    order, then the ones it leaves free), with the distribution each trial declares for it."""
    params: list[Param] = []
    dists: dict[str, BaseDistribution] = {}
    space = effective_space(comp.search_space)
    for name in [*space, *(n for n in TrainConfig.model_fields if n not in space)]:
        rule = space.get(name) or _engine_rule(name)
        if rule is None:
            continue
        dist = _distribution(name, rule, [c.get(name) for c in configs])
        if dist is None:
            continue
        seen = {_label(v) for c in configs if (v := _point(c.get(name), dist)) is not _NO_POINT}
        if len(seen) < 2:
            continue
        dists[name] = dist
        if isinstance(dist, CategoricalDistribution):
            params.append(Param(name, "categorical", choices=list(dist.choices)))
        else:
            params.append(Param(name, "numeric", log=dist.log))
    return params, dists


def _engine_rule(name: str) -> Range | Choices | None:
    """A hyperparameter the competition leaves free: a number is bounded by the values seen (an open Range),
    a choice by the engine's own options (its Literal, or a bool). None: not a scalar hyperparameter."""
    if name in NUMERIC:
        return Range()
    ann = TrainConfig.model_fields[name].annotation
    if get_origin(ann) is Literal:
        return Choices(choices=list(get_args(ann)))
    if ann is bool:
        return Choices(choices=[False, True])
    return None


def _distribution(name: str, rule: Range | Choices, observed: list[Any]) -> BaseDistribution | None:
    """The rule as an Optuna distribution, or None when it fixes the hyperparameter."""
    if isinstance(rule, Choices):
        if len(rule.choices) < 2 or not all(isinstance(c, _CATEGORICAL_TYPES) for c in rule.choices):
            return None  # fixed, or a list-valued one (milestones) no categorical axis can hold
        return CategoricalDistribution(rule.choices)
    numbers = [float(v) for v in observed if _number(v)]
    bounds = [b for b in (rule.min, rule.max) if b is not None] + numbers
    if not bounds:
        return None
    low, high = min(bounds), max(bounds)  # the space's bounds, widened to what was observed (an old rule)
    if low >= high:
        return None
    log = low > 0 and high / low >= LOG_SPAN
    if TrainConfig.model_fields[name].annotation in (int, int | None):
        low_i, high_i = math.floor(low), math.ceil(high)
        return IntDistribution(low_i, high_i, log=log and low_i >= 1)
    return FloatDistribution(low, high, log=log)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_NO_POINT = object()


def _point(v: Any, dist: BaseDistribution) -> Any:
    """A config's value as a point of `dist` (a categorical one's own choice, an int for an int one), or
    _NO_POINT: an unset optional value, a stray type (True is not the choice 1), or out of range."""
    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if (type(c) is type(v) or _number(c) and _number(v)) and c == v),
                    _NO_POINT)
    if not _number(v) or not dist.low <= v <= dist.high:
        return _NO_POINT
    if isinstance(dist, IntDistribution):
        return int(v) if float(v).is_integer() else _NO_POINT
    return float(v)
