"""Ranking validity measured on a real rescore: how well the board's order survives re-training every entry
with a fresh seed, as Kendall tau between the scores before and after (app.submissions.rescore).

Setup: a fresh SQLite database (var/bench-cache/rescore-<tag>/), migrated with app.migrate; the API app
(app.main) driven in this process over HTTP (FastAPI's TestClient) by an admin, an organizer and one
participant per team; one competition on the real CIFAR-10 copy (class-balanced subsets of the packed
tarball: 2,000 training and 2,000 test images by default, so each half of the test set holds 1,000),
ResNet18 at width 8, one seed, on the seeded `cpu` class. Each of 20 teams submits one entry, with learning
rates, batch sizes and epochs spread so that the scores spread too. Every run is trained by the real Celery
task (worker.tasks.train_run, applied in this process as a worker's child runs it: claim, engine, report).
Then the organizer POSTs a rescore of every final entry (none marked: each team's best, here its one entry),
its runs train the same way with a fresh seed, and the bench reads the rescore's report from the API.

It prints the board before and after (public half), tau over the pairs further apart than the rescore's
threshold (the pairs counted, concordant and discordant), the same on the private half, and, from the same
scores, tau at other thresholds, with tau over all pairs (threshold 0) as the baseline: a threshold that
leaves out pairs a seed can swap should raise tau above it. Nothing is asserted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid

import _common as c

ADMIN_TOKEN = "bench-rescore-admin-token-0123456789"
LRS = [0.003, 0.006, 0.012, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8]


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--entries", type=int, default=20, help="teams, one entry each")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.005, help="the rescore's threshold")
    args = p.parse_args()
    if args.quick:
        args.entries, args.train_subset, args.test_subset = 6, 500, 500
    tag = uuid.uuid4().hex[:6]
    work = c.CACHE_DIR / f"rescore-{tag}"
    work.mkdir(parents=True)
    url = f"sqlite:///{work / 'hparena.db'}"
    # Before anything reads the settings (the Celery app reads them when worker.tasks is imported).
    os.environ.update({
        "HPARENA_DATABASE_URL": url, "HPARENA_VAR_DIR": str(work / "var"), "HPARENA_DATA_DIR": str(args.cache_dir),
        "HPARENA_DATASET_PATH": str(args.data), "HPARENA_ALLOW_DOWNLOAD": "false", "HPARENA_BROKER_URL": "filesystem://",
        "HPARENA_DEVICE": "cpu" if args.device == "auto" else args.device, "HPARENA_HARDWARE_CLASS": "cpu",
        "HPARENA_ADMIN_TOKEN": ADMIN_TOKEN,
    })
    if args.threads:
        os.environ["HPARENA_WORKER_THREADS"] = str(args.threads)
    if not args.data.exists():
        raise SystemExit(f"dataset {args.data} not found; pass --data or set HPARENA_DATASET_PATH")
    c.load_cifar(args.data, args.cache_dir)  # pack the tarball once, outside any timed run
    t0 = time.perf_counter()
    try:
        report = _bench(url, args)
    finally:
        from app.db import close_engine

        close_engine(url)
    _report(report, time.perf_counter() - t0)
    shutil.rmtree(work)  # kept, with its database, when something went wrong


def _configs(n: int) -> list[dict]:
    """n distinct configs (an identical one would reuse the earlier run's result) spread over learning rate,
    batch size and epochs."""
    return [{"lr": round(LRS[i % len(LRS)] * (1 + 0.01 * (i // len(LRS))), 6), "batch_size": (32, 64, 128)[i % 3],
             "epochs": 1 + (i // len(LRS)) % 2} for i in range(n)]


def _bench(url: str, args) -> dict:
    # Imported once the environment points at the bench's database (the Celery app reads the settings).
    from fastapi.testclient import TestClient

    from app import migrate
    from app.main import create_app
    from worker.tasks import train_run

    migrate.upgrade(url)
    with TestClient(create_app()) as api:
        def call(method: str, path: str, headers: dict | None = None, **kw) -> dict:
            r = api.request(method, path, headers=headers, **kw)
            if r.status_code >= 300:
                raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
            return r.json()

        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        org = {"Authorization": "Bearer " + call("POST", "/api/admin/users", admin,
                                                  json={"name": "organizer", "role": "organizer"})["token"]}
        comp = call("POST", "/api/competitions", org, json={
            "slug": "rescore-bench", "title": "Rescore bench", "hardware_class": "cpu", "seeds": [0],
            "dataset": {"name": "cifar10", "train_subset": args.train_subset, "test_subset": args.test_subset},
            "model": {"arch": "resnet18", "width": args.width}, "budget": {"max_epochs": 2}})
        slug = comp["slug"]
        configs = _configs(args.entries)
        for i, cfg in enumerate(configs):
            team = call("POST", f"/api/competitions/{slug}/join", json={"name": f"p{i:02d}", "team": f"t{i:02d}"})
            call("POST", f"/api/competitions/{slug}/submissions", {"Authorization": f"Bearer {team['token']}"},
                 json={"config": cfg})
        print(f"[setup] {args.entries} entries, width {args.width}, {args.train_subset} training and "
              f"{args.test_subset} test images; {c.load_note()}", flush=True)
        _train_all(train_run, args.entries, "entries")
        rescore = call("POST", f"/api/competitions/{slug}/rescores", org,
                       json={"submission_ids": None, "threshold": args.threshold})
        print(f"[rescore {rescore['id']}] round {rescore['round']}, seeds {rescore['seeds']}, "
              f"{len(rescore['submission_ids'])} entries", flush=True)
        _train_all(train_run, len(rescore["submission_ids"]) * len(rescore["seeds"]), "rescore")
        report = call("GET", f"/api/competitions/{slug}/rescores/{rescore['id']}", org)
        if report["status"] != "done":
            raise SystemExit(f"rescore still {report['status']} after every queued run was trained")
        report["configs"] = {e["submission_id"]: configs[int(e["team"][1:])] for e in report["entries"]}
        return report


def _train_all(train_run, n: int, what: str) -> None:
    t0 = time.perf_counter()
    for k in range(1, n + 1):
        outcome = train_run.apply().get()
        if outcome != "succeeded":
            print(f"[{what} {k}/{n}] ended {outcome!r}", flush=True)
        if k % 5 == 0 or k == n:
            print(f"[{what}] {k}/{n} runs trained, {time.perf_counter() - t0:.0f} s", flush=True)


def _report(report: dict, seconds: float) -> None:
    from app.submissions.rescore import kendall_tau

    entries = sorted(report["entries"], key=lambda e: -(e["before_accuracy"] or 0))
    after_order = sorted((e for e in entries if e["after_accuracy"] is not None), key=lambda e: -e["after_accuracy"])
    rank_after = {e["submission_id"]: k for k, e in enumerate(after_order, 1)}
    print()
    rows = []
    for k, e in enumerate(entries, 1):
        cfg = report["configs"][e["submission_id"]]
        after = e["after_accuracy"]
        rows.append([k, rank_after.get(e["submission_id"], "-"), e["team"], cfg["lr"], cfg["batch_size"],
                     cfg["epochs"], f"{e['before_accuracy']:.4f}", "-" if after is None else f"{after:.4f}",
                     "-" if after is None else f"{after - e['before_accuracy']:+.4f}",
                     f"{e['before_private_accuracy']:.4f}",
                     "-" if e["after_private_accuracy"] is None else f"{e['after_private_accuracy']:.4f}"])
    print(c.table(["rank before", "rank after", "team", "lr", "batch", "epochs", "public before", "public after",
                   "change", "private before", "private after"], rows))
    moves = [abs(e["after_accuracy"] - e["before_accuracy"]) for e in entries if e["after_accuracy"] is not None]
    print()
    print(f"median |public change| between the two seeds: {statistics.median(moves):.4f} "
          f"(max {max(moves):.4f}); failed: {report['failed']}")
    for half in ("public", "private"):
        t = report[half]
        print(f"{half}: Kendall tau = {_fmt(t['tau'])} over {t['pairs']} pairs further apart than "
              f"{report['threshold']:g} before ({t['concordant']} concordant, {t['discordant']} discordant, "
              f"{t['tied_after']} tied after; {t['within_threshold']} pairs within the threshold left out)")
    scores = {e["submission_id"]: (e["before_accuracy"], e["after_accuracy"]) for e in entries}
    sweep = {th: kendall_tau(scores, th) for th in (0.0, 0.005, 0.01, 0.02, 0.05)}
    print("public tau by threshold: " + "; ".join(f"{th:g}: {_fmt(t.tau)} ({t.pairs} pairs)"
                                                   for th, t in sweep.items()))
    base, here = sweep[0.0].tau, kendall_tau(scores, report["threshold"]).tau
    if base is not None and base > 0 and here is not None:
        print(f"RATIO tau at threshold {report['threshold']:g} / tau over all pairs = {here / base:.2f}x")
    print(f"{c.load_note()}; wall time {seconds:.0f} s")


def _fmt(tau: float | None) -> str:
    return "n/a" if tau is None else f"{tau:.3f}"


if __name__ == "__main__":
    main()
