"""Cost prediction against real runs: how far app.costs' predicted device-seconds land from what the runs
then measure, as the throughput table learns from the runs before them.

Setup: a fresh SQLite database (var/bench-cache/prediction-<tag>/), migrated with app.migrate; a CPU hardware
class of the bench's own, with the seeded `cpu` class's prior (images/s of a width-64 ResNet18 on 32 px);
one competition per (width, training subset) on the real CIFAR-10 (class-balanced subsets of the packed
tarball, test subset 500), all of that class, so they share its throughput table. Then, one at a time, each
entry of the schedule is submitted through the service the API's POST calls
(app.submissions.service.create_submission: it prices the entry with app.costs.predict_seconds) and trained
by the real Celery task (worker.tasks.train_run, applied in this process as a worker's child runs it: claim,
engine, report; runs.finish folds the run's measured images/s into the table). The schedule varies width
(8, 12, 16), epochs (1-3), batch size (32-128) and training-set size (1,000, 2,000): the first entry is priced
from the class's prior, each later one from what the runs before it measured: the same model at the same
batch size (`measured`), at other batch sizes (`other batch`), or other widths scaled by relative compute
(`other width`); see app/costs.py for the rules.

Error = (measured device-seconds - predicted) / predicted, per run, as the API reports it (prediction_error).
Baseline, measured in the same run: the same entries priced from the prior alone (a class of the same prior
whose table stays empty). It prints every run, the median absolute error of the table-priced runs and of the
prior-only prices of the same runs, and their ratio; the target (< 25% from the table) is this bench's
own. Other processes on the machine's cores change the
measured times (the load average is printed); nothing is asserted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import types
import uuid

import _common as c

# (width, training subset, epochs, batch size).
SCHEDULE = [
    (8, 1000, 1, 64),  # priced from the class's prior
    (8, 1000, 2, 64),  # the same model and batch measured
    (8, 2000, 1, 128),  # the same model at another batch size
    (16, 1000, 1, 64),  # another width, scaled by compute
    (16, 2000, 2, 128),
    (8, 2000, 1, 32),  # between or beyond two measured batch sizes
    (12, 1000, 2, 64),  # between two measured widths
    (16, 1000, 2, 64),
    (8, 1000, 2, 128),
    (12, 2000, 1, 128),
    (16, 2000, 1, 32),
    (8, 2000, 2, 64),
]
QUICK = [(8, 500, 1, 32), (8, 500, 2, 32), (16, 500, 1, 32), (12, 500, 1, 64)]
TEST_SUBSET = 500


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--runs", type=int, default=10, help=f"entries of the schedule to run (at most {len(SCHEDULE)})")
    args = p.parse_args()
    schedule = QUICK if args.quick else SCHEDULE[:max(2, min(args.runs, len(SCHEDULE)))]
    tag = uuid.uuid4().hex[:6]
    work = c.CACHE_DIR / f"prediction-{tag}"
    work.mkdir(parents=True)
    klass, prior_only = f"bench-{tag}", f"bench-prior-{tag}"
    url = f"sqlite:///{work / 'hparena.db'}"
    # Before anything reads the settings (the Celery app reads them when worker.tasks is imported).
    os.environ.update({
        "HPARENA_DATABASE_URL": url, "HPARENA_VAR_DIR": str(work / "var"), "HPARENA_DATA_DIR": str(args.cache_dir),
        "HPARENA_DATASET_PATH": str(args.data), "HPARENA_ALLOW_DOWNLOAD": "false", "HPARENA_BROKER_URL": "filesystem://",
        "HPARENA_DEVICE": "cpu" if args.device == "auto" else args.device, "HPARENA_HARDWARE_CLASS": klass,
    })
    if args.threads:
        os.environ["HPARENA_WORKER_THREADS"] = str(args.threads)
    if not args.data.exists():
        raise SystemExit(f"dataset {args.data} not found; pass --data or set HPARENA_DATASET_PATH")
    c.load_cifar(args.data, args.cache_dir)  # pack the tarball once, outside any timed run
    try:
        rows = _bench(url, klass, prior_only, schedule, args.data, args.cache_dir, os.environ["HPARENA_DEVICE"])
    finally:
        from app.db import close_engine

        close_engine(url)
    _report(rows)
    shutil.rmtree(work)  # kept, with its database, when something went wrong


def _bench(url: str, klass: str, prior_only: str, schedule, data, cache, device: str) -> list[dict]:
    # Imported once the environment points at the bench's database (the Celery app reads the settings).
    from sqlalchemy import select

    from app import costs, migrate
    from app.admin.models import HardwareClass
    from app.auth.models import User
    from app.competitions.models import Competition
    from app.competitions.schemas import CompetitionCreate
    from app.competitions.service import create_competition, join, membership
    from app.db import session_scope, utcnow
    from app.submissions.models import Run
    from app.submissions.service import create_submission
    from worker.engine.config import RunSpec, TrainConfig
    from worker.engine.train import train
    from worker.tasks import train_run

    migrate.upgrade(url)
    with session_scope() as s:
        seeded = s.get(HardwareClass, "cpu")
        for name in (klass, prior_only):
            s.add(HardwareClass(name=name, device_type="cpu", name_pattern="", description="bench/prediction.py",
                                train_images_per_sec=seeded.train_images_per_sec,
                                eval_images_per_sec=seeded.eval_images_per_sec, updated_at=utcnow()))
    print(f"[setup] class {klass}: prior {seeded.train_images_per_sec:g} / {seeded.eval_images_per_sec:g} "
          f"images/s (train / eval, width 64, 32 px); {len(schedule)} runs; {c.load_note()}")

    # Torch's and oneDNN's one-time set-up, paid once per worker process before its first run, is paid here
    # by the engine alone: no run of the bench's class learns from it.
    warm = c.load_cifar(data, cache, train_subset=300, test_subset=TEST_SUBSET)
    t0 = time.perf_counter()
    train(RunSpec(model={"width": 8}, config={"epochs": 1, "batch_size": 32}), warm, device)
    print(f"[warm-up] one engine run outside the bench: {time.perf_counter() - t0:.1f} s", flush=True)

    comps: dict[tuple[int, int], tuple[int, int]] = {}  # (width, subset) -> (competition id, user id)
    rows = []
    for i, (width, subset, epochs, batch) in enumerate(schedule, 1):
        with session_scope() as s:
            if (width, subset) not in comps:
                comp = create_competition(s, CompetitionCreate(
                    slug=f"w{width}-n{subset}", title=f"width {width}, {subset} images", hardware_class=klass,
                    dataset={"name": "cifar10", "train_subset": subset, "test_subset": TEST_SUBSET},
                    model={"arch": "resnet18", "width": width}, budget={"max_epochs": 3}), None)
                user, _team, _token = join(s, comp, f"bench-{width}-{subset}", "bench", None, None)
                comps[width, subset] = comp.id, user.id
        with session_scope() as s:
            comp_id, user_id = comps[width, subset]
            comp, user = s.get(Competition, comp_id), s.get(User, user_id)
            cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=0.05 + 0.01 * i)
            sub, _ = create_submission(s, comp, membership(s, comp, user), user, cfg)
            s.flush()
            run = s.scalars(select(Run).where(Run.submission_id == sub.id)).one()
            rates = costs.rates(s, klass, run.spec)
            baseline = costs.predict_seconds(
                s, types.SimpleNamespace(id=comp.id, hardware_class=prior_only, dataset=comp.dataset), run.spec)
            run_id = run.id
        outcome = train_run.apply().get()
        with session_scope() as s:
            run = s.get(Run, run_id)
            if outcome != "succeeded" or run.status != "succeeded":
                raise SystemExit(f"run {run_id} ended {outcome!r}: {run.error}")
            rows.append({"i": i, "width": width, "images": subset, "epochs": epochs, "batch": batch,
                         "basis": rates.basis, "predicted": run.predicted_seconds, "measured": run.gpu_seconds,
                         "baseline": baseline, "load": os.getloadavg()[0]})
        r = rows[-1]
        print(f"[run {i}] width {width}, {subset} images x {epochs} epochs, batch {batch}: predicted "
              f"{r['predicted']:.1f} s, measured {r['measured']:.1f} s ({_err(r, 'predicted'):+.0%}); "
              f"priced from {rates.source}", flush=True)
    return rows


def _err(row: dict, key: str) -> float:
    return (row["measured"] - row[key]) / row[key]


def _median_error(rows: list[dict], key: str = "predicted") -> float:
    return statistics.median(abs(_err(r, key)) for r in rows)


def _report(rows: list[dict]) -> None:
    print()
    print(c.table(
        ["run", "width", "images", "epochs", "batch", "priced from", "predicted s", "measured s", "error",
         "prior-only s", "prior error", "load"],
        [[r["i"], r["width"], r["images"], r["epochs"], r["batch"], r["basis"], f"{r['predicted']:.1f}",
          f"{r['measured']:.1f}", f"{_err(r, 'predicted'):+.0%}", f"{r['baseline']:.1f}",
          f"{_err(r, 'baseline'):+.0%}", f"{r['load']:.1f}"] for r in rows]))
    learned = [r for r in rows if r["basis"] != "prior"]
    table_err = _median_error(learned)
    prior_err = _median_error(learned, "baseline")
    print()
    parts = [f"{basis}: {_median_error(group):.1%} over {len(group)}" for basis in ("measured", "other batch",
             "other width") if (group := [r for r in learned if r["basis"] == basis])]
    print(f"median |prediction error|, {len(learned)} runs priced from the table: {table_err:.1%} "
          f"({'; '.join(parts)})")
    print(f"median |prediction error| of the same runs priced from the class's prior alone: {prior_err:.1%}")
    print(c.load_note())
    print(f"RATIO prior-only/table median |error| = {prior_err / table_err:.1f}x (table error target < 25%): "
          f"{c.verdict(table_err < 0.25)}")


if __name__ == "__main__":
    main()
