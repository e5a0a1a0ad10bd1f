"""Cost before queueing: measured throughput per hardware class, predicted device-seconds per run, and the
team's GPU-hour budget. (A queued submission's position and ETA, from these predictions: app.eta.)

Throughput. Every succeeded run folds its measured images/s (training, and evaluation) into the `throughput`
row of its competition's class, model (`model_key`: architecture, width, stem, precision settings and the
effective batch size) and image size (`learn`). A run's device-seconds are then predicted (`predict`) from
the nearest thing known, in this order:
1. the row of the same class, model, batch size and image size (evaluation does not depend on the training
   batch: its rate is the mean over the model's rows at every batch size, weighted by their runs);
2. the same model measured at other batch sizes: its training seconds per image are a per-image part plus a
   per-step part (optimizer step, EMA update, augmentation calls) divided by the batch, fitted through the
   two nearest batch sizes (one measured batch size: its figure as it is);
3. the same architecture, stem and settings measured at other widths or image sizes (each first brought to
   this batch size as in 2). Seconds per image are taken to be affine in the model's compute per image
   (`relative_compute`: width^2 x pixels): a fixed part (per-layer overheads, which dominate narrow networks)
   plus a part proportional to compute. Two measured shapes give the line through them; one gives the line
   through it whose fixed part is OVERHEAD_SHARE of the cost at width 64 on 32 px (`relative_cost`);
4. the class's prior (hardware_class.train_images_per_sec / eval_images_per_sec, stated for a width-64
   ResNet18 on 32-pixel images), scaled by the same `relative_cost`.

Images counted. Training: epochs x whole batches of the training set (the engine drops the ragged last
batch), capped by the budget's max_seconds. Evaluation: the public half of the test set after every epoch
(when spec.eval_every_epoch, without TTA), plus the whole test set once per TTA view at the end. The
training and test set sizes come from the competition's subsets when set, else from a finished run of the
competition (its result says what it loaded), else CIFAR-10's 50,000 / 10,000.

Budget: a team's spent device-seconds are its runs' charged_seconds; its reserved ones are the
predicted_seconds of its queued and running runs; what is left is budget x 3600 - spent - reserved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.admin.models import HardwareClass, Throughput
from app.competitions.models import Competition
from app.db import upsert_insert, utcnow
from app.errors import BudgetExceeded
from app.hardware import class_cost_unit
from app.submissions.models import Run, RunStatus, Submission
from worker.engine.config import RunSpec
from worker.engine.result import TrainResult

log = logging.getLogger("hparena.costs")

# CIFAR-10's sizes: what a competition that sets no subsets and has no finished run is assumed to load.
DEFAULT_TRAIN_IMAGES, DEFAULT_TEST_IMAGES = 50_000, 10_000
CIFAR_CLASSES = 10
# The prior of a class with no row (a competition naming a class that was since deleted): the seeded "cpu".
FALLBACK_PRIOR = (25.0, 100.0)
# Views the final evaluation runs per image (worker.engine.augment.tta_views).
TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}
# How a finished run's rate is folded into its row: the mean of the first 1/ALPHA runs, then an exponential
# mean giving the newest run weight ALPHA (so the table follows a class whose machines change).
ALPHA = 0.2
# The share of a width-64, 32-pixel ResNet18's time per image that does not shrink with the model's compute:
# what keeps a width-8 network from being predicted 64x faster when it is a few times faster.
OVERHEAD_SHARE = 0.1
STEM_COMPUTE = {"cifar": 1.0, "deep": 1.05, "imagenet": 1 / 16}  # the imagenet stem works on 1/16 of the pixels


# ----------------------------------------------------------------------------------------------------
# What a run's cost depends on
# ----------------------------------------------------------------------------------------------------


def model_key(spec: RunSpec) -> str:
    """What sets the cost of one image apart from its size: `arch/width/stem/settings/batch`, e.g.
    `resnet18/w16/cifar/auto+cl/b128` (SE blocks add `+se` to the stem, compile `+compile` to the settings;
    the batch is the effective one, batch_size x grad_accum_steps: each optimizer step, EMA update and
    augmentation call costs the same whatever the batch, so small batches cost more per image)."""
    c = spec.config
    stem = c.stem + ("+se" if c.se_blocks else "")
    settings = c.precision + ("+cl" if c.channels_last else "") + ("+compile" if c.compile else "")
    return f"{spec.model.arch}/w{spec.model.width}/{stem}/{settings}/b{c.batch_size * c.grad_accum_steps}"


def relative_compute(width: int, image_size: int, stem: str = "cifar") -> float:
    """A ResNet18's work per image relative to width 64 on 32 px with the CIFAR stem: every convolution's
    cost grows with channels in x channels out (width^2) and with the pixels it covers (size^2)."""
    return (width / 64) ** 2 * (image_size / 32) ** 2 * STEM_COMPUTE.get(stem.split("+")[0], 1.0)


def relative_cost(compute: float) -> float:
    """Time per image relative to width 64 on 32 px, for a model of this relative compute (see the module)."""
    return OVERHEAD_SHARE + (1 - OVERHEAD_SHARE) * compute


@dataclass(frozen=True)
class _Key:
    """A model_key read back."""

    arch: str
    width: int
    stem: str
    settings: str
    batch: int

    @classmethod
    def parse(cls, key: str) -> _Key:
        arch, width, stem, settings, batch = key.split("/")
        return cls(arch, int(width[1:]), stem, settings, int(batch[1:]))

    @property
    def family(self) -> tuple[str, str, str]:
        """What must match for one model's measurement to price another (width, size and batch may differ)."""
        return self.arch, self.stem, self.settings


@dataclass(frozen=True)
class Rates:
    train: float  # images/s
    eval: float
    basis: str  # measured, other batch, other width or prior: what they were derived from
    source: str  # the same, in words


@dataclass(frozen=True)
class Prediction:
    seconds: float  # device-seconds: train + eval
    train_seconds: float
    eval_seconds: float
    train_images: int  # per epoch
    test_images: int
    rates: Rates


# ----------------------------------------------------------------------------------------------------
# Throughput: learned from finished runs, read for predictions
# ----------------------------------------------------------------------------------------------------


def learn(session: Session, run: Run) -> None:
    """Fold a succeeded run's measured images/s into its class's row (the first such run creates it).

    Training images/s are the images trained over the device-seconds that were not evaluation (at least the
    training phase), so a prediction from the row adds up to what such a run is charged. Nothing is learned
    from a reused run (it trained nothing here) or one that ran on a device not of its class."""
    row = session.execute(
        select(Run.result, Run.reused_from_run_id, Run.device_mismatch, Competition.hardware_class)
        .join(Submission, Submission.id == Run.submission_id).join(Competition, Competition.id ==
                                                                    Submission.competition_id)
        .where(Run.id == run.id)).one()
    if row.result is None or row.reused_from_run_id is not None or row.device_mismatch:
        return
    try:
        r = TrainResult.model_validate(row.result)
    except ValidationError:  # a record of another version: no figures to learn, and no reason to fail the run
        log.warning("run %s: its result does not validate as a TrainResult; the throughput table skips it", run.id)
        return
    train_images = r.steps_completed * r.effective_batch_size
    train_seconds = max(r.device_seconds - r.timings.eval_seconds, r.timings.train_seconds)
    eval_images = _eval_images(r)
    if train_images <= 0 or train_seconds <= 0 or eval_images <= 0 or r.timings.eval_seconds <= 0:
        return
    _fold(session, row.hardware_class, model_key(r.spec), r.spec.data.image_size,
          train_images / train_seconds, eval_images / r.timings.eval_seconds)


def _eval_images(r: TrainResult) -> int:
    """Images the model evaluated: the public half after each epoch, every TTA view of the test set at the end."""
    per_epoch = sum(1 for h in r.history if h.test_accuracy is not None) * r.test_split.public
    final = (r.test_split.public + r.test_split.private) * TTA_VIEWS[r.spec.config.tta] if r.metrics else 0
    return per_epoch + final


def _fold(session: Session, hardware_class: str, key: str, image_size: int, train_ips: float,
          eval_ips: float) -> None:
    pk = (Throughput.hardware_class == hardware_class) & (Throughput.model_key == key) & \
        (Throughput.image_size == image_size)
    now = utcnow()
    # Two workers finishing at once: the insert of the second is a no-op, and each folds under the row lock.
    session.execute(upsert_insert(session.get_bind(), Throughput).values(
        hardware_class=hardware_class, model_key=key, image_size=image_size, train_images_per_sec=train_ips,
        eval_images_per_sec=eval_ips, runs=0, updated_at=now).on_conflict_do_nothing())
    t = session.scalars(select(Throughput).where(pk).with_for_update()
                        .execution_options(populate_existing=True)).one()
    t.runs += 1
    weight = max(1 / t.runs, ALPHA)
    # Averaged as seconds per image (what predictions add up), not as images per second.
    t.train_images_per_sec = 1 / ((1 - weight) / t.train_images_per_sec + weight / train_ips)
    t.eval_images_per_sec = 1 / ((1 - weight) / t.eval_images_per_sec + weight / eval_ips)
    t.updated_at = now
    session.flush()


def rates(session: Session, hardware_class: str, spec: RunSpec) -> Rates:
    """Images/s for training and evaluation of this spec's model on this class (see the module's docstring)."""
    want, size = _Key.parse(model_key(spec)), spec.data.image_size
    shapes: dict[tuple[int, int], list[tuple[_Key, Throughput]]] = {}  # (width, image size) -> its rows
    for t in session.scalars(select(Throughput).where(Throughput.hardware_class == hardware_class)):
        k = _Key.parse(t.model_key)
        if k.family == want.family:
            shapes.setdefault((k.width, t.image_size), []).append((k, t))
    if not shapes:
        prior = session.get(HardwareClass, hardware_class)
        train, evaluate = (prior.train_images_per_sec, prior.eval_images_per_sec) if prior else FALLBACK_PRIOR
        cost = relative_cost(relative_compute(want.width, size, want.stem))
        return Rates(train / cost, evaluate / cost, "prior",
                     f"the {hardware_class} prior (width 64, 32 px), scaled by relative cost {cost:.3g}")
    # Each measured shape at this batch size (seconds per image), then across shapes by compute.
    points = []  # (relative compute, train s/image, eval s/image, (width, size))
    for (width, image_size), rows in shapes.items():
        train_t = _at_batch([(k.batch, 1 / t.train_images_per_sec) for k, t in rows], want.batch)
        eval_t = sum(t.runs / t.eval_images_per_sec for _, t in rows) / max(sum(t.runs for _, t in rows), 1)
        points.append((relative_compute(width, image_size, want.stem), train_t, eval_t, (width, image_size)))
    here = next((p for p in points if p[3] == (want.width, size)), None)
    if here is not None:
        rows = shapes[want.width, size]
        exact = next((t for k, t in rows if k.batch == want.batch), None)
        if exact is not None:
            return Rates(1 / here[1], 1 / here[2], "measured",
                         f"measured on {hardware_class}: {exact.runs} runs of {exact.model_key} at {size} px")
        batches = ", ".join(str(k.batch) for k, _ in sorted(rows, key=lambda r: r[0].batch))
        return Rates(1 / here[1], 1 / here[2], "other batch",
                     f"this model measured on {hardware_class} at batch {batches}, for batch {want.batch}")
    compute = relative_compute(want.width, size, want.stem)
    points.sort(key=lambda p: abs(math.log(p[0] / compute)))
    near = points[:2] if len(points) > 1 and points[0][0] != points[1][0] else points[:1]
    train = _seconds_per_image([(p[0], p[1]) for p in near], compute)
    evaluate = _seconds_per_image([(p[0], p[2]) for p in near], compute)
    shown = " and ".join(f"width {p[3][0]} at {p[3][1]} px" for p in near)
    return Rates(1 / train, 1 / evaluate, "other width",
                 f"{shown} measured on {hardware_class}, scaled to width {want.width} by relative compute")


def _at_batch(points: list[tuple[int, float]], batch: int) -> float:
    """Training seconds per image at `batch` from measured (batch, seconds per image) points of one model:
    the measured figure; else, between two batch sizes, a per-image part plus a per-step part (/ batch)
    through the nearest two (both kept >= 0); else the nearest one's figure."""
    for b, t in points:
        if b == batch:
            return t
    points = sorted(points, key=lambda p: abs(math.log(p[0] / batch)))
    (b0, t0), *rest = points
    if not rest:
        return t0
    b1, t1 = rest[0]
    per_step = max(0.0, (t0 - t1) / (1 / b0 - 1 / b1))
    per_image = t0 - per_step / b0
    if per_image < 0:
        per_image, per_step = 0.0, t0 * b0
    return per_image + per_step / batch


def _seconds_per_image(points: list[tuple[float, float]], compute: float) -> float:
    """Seconds per image at `compute`, from measured (compute, seconds per image) points: the line through two
    (its slope kept >= 0, more work is never faster; and its fixed part >= 0, else proportional to compute
    from the nearer point); through one, the line whose fixed part is OVERHEAD_SHARE (`relative_cost`)."""
    (x0, t0), *rest = points
    if rest:
        (x1, t1), = rest
        slope = max(0.0, (t1 - t0) / (x1 - x0))
        fixed = t0 - slope * x0
        if fixed >= 0:
            return fixed + slope * compute
        return t0 * compute / x0
    return t0 * relative_cost(compute) / relative_cost(x0)


# ----------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------


def dataset_sizes(session: Session, comp: Competition) -> tuple[int, int]:
    """(training images, test images) a run of this competition loads, without loading anything."""
    data = comp.dataset
    classes = CIFAR_CLASSES if data.name == "cifar10" else 1
    train = data.train_subset // classes * classes if data.train_subset else None
    test = data.test_subset // classes * classes if data.test_subset else None
    if train is None or test is None:
        # Every run of a competition loads the same data: any succeeded one says how much (one index probe on
        # (competition_id, status), then the run's stored result; no scan, however many submissions exist).
        done = (select(Submission.id).where(Submission.competition_id == comp.id,
                                            Submission.status == RunStatus.succeeded).limit(1).scalar_subquery())
        seen = session.execute(
            select(Run.result["dataset"]["train"].as_integer(), Run.result["dataset"]["test"].as_integer())
            .where(Run.submission_id == done, Run.result.is_not(None)).limit(1)).first()
        if seen is not None and seen[0] and seen[1]:
            train, test = train or seen[0], test or seen[1]
    return train or DEFAULT_TRAIN_IMAGES, test or DEFAULT_TEST_IMAGES


def predict(session: Session, comp: Competition, spec: RunSpec) -> Prediction:
    """Device-seconds of one run of `spec` on the competition's class: training plus evaluation."""
    r = rates(session, comp.hardware_class, spec)
    n_train, n_test = dataset_sizes(session, comp)
    batch = spec.config.batch_size * spec.config.grad_accum_steps
    per_epoch = max(n_train // batch, 1) * batch
    epochs = spec.config.epochs
    train = epochs * per_epoch / r.train
    evaluated_epochs = epochs
    if spec.budget.max_seconds is not None and train > spec.budget.max_seconds:
        # The time budget stops training early: fewer epochs, and fewer per-epoch evaluations.
        evaluated_epochs = math.ceil(epochs * spec.budget.max_seconds / train)
        train = spec.budget.max_seconds
    eval_images = (n_test // 2 * evaluated_epochs if spec.eval_every_epoch else 0) + \
        n_test * TTA_VIEWS[spec.config.tta]
    evaluate = eval_images / r.eval
    return Prediction(seconds=train + evaluate, train_seconds=train, eval_seconds=evaluate,
                      train_images=per_epoch, test_images=n_test, rates=r)


def predict_seconds(session: Session, comp: Competition, spec: RunSpec) -> float:
    """Predicted device-seconds of one run (training + evaluation) on the competition's class."""
    return predict(session, comp, spec).seconds


# ----------------------------------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    spent: float  # charged device-seconds of the team's runs that are over
    reserved: float  # predicted device-seconds of its queued and running runs
    runs_charged: int
    runs_unfinished: int


def usage(session: Session, comp: Competition, team_id: int) -> Usage:
    unfinished = Run.status.in_([RunStatus.queued, RunStatus.running])
    row = session.execute(
        select(func.coalesce(func.sum(Run.charged_seconds), 0.0),
               func.coalesce(func.sum(case((unfinished, func.coalesce(Run.predicted_seconds, 0.0)), else_=0.0)),
                             0.0),
               func.count(Run.charged_seconds), func.count(case((unfinished, 1))))
        .join(Submission, Submission.id == Run.submission_id)
        # Round 0 only: a rescore's runs (app.submissions.rescore) are the organizer's, not the team's.
        .where(Submission.competition_id == comp.id, Submission.team_id == team_id, Run.round == 0)).one()
    return Usage(spent=float(row[0]), reserved=float(row[1]), runs_charged=row[2], runs_unfinished=row[3])


def budget_view(session: Session, comp: Competition, team_id: int) -> dict[str, Any]:
    """The team's GPU-hour budget as the team sees it (fields of BudgetOut)."""
    u = usage(session, comp, team_id)
    total = None if comp.gpu_hour_budget is None else comp.gpu_hour_budget * 3600
    remaining = None if total is None else max(0.0, total - u.spent - u.reserved)
    return {"team_id": team_id, "budget_gpu_hours": comp.gpu_hour_budget, "budget_seconds": total,
            "spent_seconds": u.spent, "reserved_seconds": u.reserved, "remaining_seconds": remaining,
            "remaining_gpu_hours": None if remaining is None else remaining / 3600,
            "cost_unit": class_cost_unit(session, comp.hardware_class), "runs_charged": u.runs_charged,
            "runs_unfinished": u.runs_unfinished}


def check_budget(session: Session, comp: Competition, team_id: int, predicted: float) -> None:
    """Raise BudgetExceeded (429, says how much is left) when `predicted` seconds exceed what is left of the
    team's GPU-hour budget (spent + predicted for its unfinished runs). Call with the team row locked.
    An entry predicted to cost nothing (every run reused) is never refused."""
    if comp.gpu_hour_budget is None or predicted <= 0:
        return
    u = usage(session, comp, team_id)
    remaining = comp.gpu_hour_budget * 3600 - u.spent - u.reserved
    if predicted <= remaining:
        return
    left = max(0.0, remaining)
    unit = class_cost_unit(session, comp.hardware_class)
    raise BudgetExceeded(
        f"this entry is predicted to cost {predicted:.0f} {unit} ({predicted / 3600:.4f} h), but the team's "
        f"budget of {comp.gpu_hour_budget:g} GPU-hours has {left / 3600:.4f} h ({left:.0f} s) left: "
        f"{u.spent:.0f} s spent, {u.reserved:.0f} s reserved by {u.runs_unfinished} unfinished runs",
        budget_seconds=comp.gpu_hour_budget * 3600, spent_seconds=u.spent, reserved_seconds=u.reserved,
        remaining_seconds=left, predicted_seconds=predicted, cost_unit=unit)
