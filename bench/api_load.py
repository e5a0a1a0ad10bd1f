"""The API under load on PostgreSQL: the public leaderboard at 100,000 submissions, submission intake, and
dispatch latency from a POST to a real worker's claim.

Setup: a fresh PostgreSQL database, migrated with app.migrate; 1,000 teams (one participant each) and
100,000 succeeded submissions with their runs, in the tables the API writes, by two INSERT ... SELECT
statements that PostgreSQL expands (generate_series); then leaderboard.service.rebuild_best fills
team_best, as migration 0006 backfills it, VACUUM ANALYZE leaves the tables as autovacuum would, and a
CHECKPOINT writes the load out before anything is timed. The real API runs as 2 uvicorn worker processes
(no access log, rate limits off) on Redis db 14 as its broker, started by app.serve (`hparena api --workers N`):
`uvicorn --workers N` with TCP_NODELAY on. --stock-uvicorn runs the CLI as it is, whose multi-worker
listener loses TCP_NODELAY and adds ~40 ms to every keep-alive request.

(a) Leaderboard: GET /api/competitions/{slug}/leaderboard, one client, one request at a time. Baseline,
    measured on the same data: the ranking this table replaced (window functions over every submission,
    the query leaderboard() ran before 0006), timed in this process as SQL alone, against the new query
    in this process; and the two must rank the same entries. Target: HTTP p99 < 50 ms.
(b) Intake: POST /api/competitions/{slug}/submissions from concurrent client threads, each a different
    team's token, for a fixed time. The competition has a hardware class of its own, so no worker takes
    its wake-up tokens, and no quota. Target >= 300 submissions/s.
(c) Dispatch: one real worker (`worker.cli worker`, CPU) on a tiny competition (a 400-image CIFAR-10 cut,
    width 8, one epoch). One submission at a time after the previous finished; the latency is the run's
    started_at (the worker's claim) minus the submission's created_at (stamped in the POST's transaction,
    just before its commit and its 201): the API's and the worker's clocks, one machine's. Target < 200 ms.

The client threads, the API, PostgreSQL and the worker share this machine's cores (and whatever else runs
on them): the numbers understate what dedicated hosts would do. Nothing is asserted; the script exits 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

import _common as c
import httpx
import redis
from sqlalchemy import create_engine, func, select, text

from app import migrate
from app.admin.schemas import HardwareClassIn
from app.admin.service import put_hardware_class
from app.competitions.models import Team
from app.competitions.schemas import CompetitionCreate
from app.competitions.service import create_competition
from app.db import session_scope, utcnow
from app.leaderboard.service import leaderboard, rebuild_best
from app.submissions.models import RunStatus, Submission
from app.submissions.service import run_spec
from worker.engine.config import TrainConfig
from worker.processes import python_cmd, spawn, stop, wait_http

BROKER_URL = os.environ.get("HPARENA_BENCH_BROKER", "redis://127.0.0.1:6379/14")
BOARD_P99_MS, INTAKE_PER_S, DISPATCH_MS = 50.0, 300.0, 200.0
CONFIG = {"lr": 0.05, "batch_size": 32}
SPACE = {"lr": {"min": 0.001, "max": 1.0}, "batch_size": {"choices": [32, 64, 128]}}


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--teams", type=int, default=1000)
    p.add_argument("--submissions", type=int, default=100_000, help="succeeded submissions, spread over the teams")
    p.add_argument("--board-requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=12, help="intake client threads (one team each)")
    p.add_argument("--intake-seconds", type=float, default=10.0)
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn --workers")
    p.add_argument("--dispatches", type=int, default=5, help="0: no worker, no (c)")
    p.add_argument("--stock-uvicorn", action="store_true",
                   help="`uvicorn --workers N` as is: no TCP_NODELAY, ~40 ms more per request (app/serve.py)")
    args = p.parse_args()
    if args.quick:
        args.teams, args.submissions, args.board_requests, args.intake_seconds, args.dispatches = 100, 5000, 100, 3, 2
    args.clients = min(args.clients, args.teams)

    name = f"hparena_bench_{uuid.uuid4().hex[:8]}"
    url = c.create_pg_database(name)
    tag = uuid.uuid4().hex[:6]  # queues of this run's own: nothing else consumes or fills them
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    work = c.CACHE_DIR / f"api-load-{tag}"
    procs = []
    try:
        t0 = time.perf_counter()
        migrate.upgrade(url)
        load, tiny = _seed(url, args, tag, _tiny_cifar(args.data, args.cache_dir))
        print(f"[setup] {args.teams:,} teams, {args.submissions:,} submissions in {name} "
              f"in {time.perf_counter() - t0:.1f} s; {c.load_note()}")
        env = {**os.environ, "HPARENA_DATABASE_URL": url, "HPARENA_BROKER_URL": BROKER_URL,
               "HPARENA_VAR_DIR": str(work / "var"), "HPARENA_DATA_DIR": str(work / "data"),
               "HPARENA_ADMIN_TOKEN": f"bench-admin-{tag}-{uuid.uuid4().hex}", "HPARENA_DEVICE": "cpu",
               "HPARENA_RATE_LIMIT_ENABLED": "false"}
        port = _free_port()
        if args.stock_uvicorn:
            api = python_cmd("uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port), "--workers",
                             str(args.api_workers), "--no-access-log", "--log-level", "warning")
        else:
            api = [sys.executable, "-c", "import sys; from app.serve import serve; "
                   "serve('127.0.0.1', int(sys.argv[1]), int(sys.argv[2]), log_level='warning', access_log=False)",
                   str(port), str(args.api_workers)]
        print(f"[setup] API: {' '.join(api[1:])}")
        procs.append(spawn(api, work / "api.log", env))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/health")

        rows = _board(base, load, args.board_requests)
        rows += _intake(base, load, args.clients, args.intake_seconds)
        if args.dispatches:
            # Started only now: its start-up (torch, the dataset) would otherwise share the cores with (a), (b).
            procs.append(spawn(python_cmd("worker.cli", "worker", "--hostname", f"bench-{tag}@%h"),
                               work / "worker.log", {**env, "HPARENA_HARDWARE_CLASS": tiny["hardware_class"]}))
            rows += _dispatch(base, tiny, args.dispatches, work / "worker.log")
        print()
        print(c.table(["metric", "measured", "target", "verdict"], rows))
        print(c.load_note())
        shutil.rmtree(work)  # kept, with the API's and the worker's logs, when something went wrong
    finally:
        for proc in reversed(procs):
            stop(proc)
        broker.flushdb()
        c.drop_pg_database(name)


# ---- database: a fresh one, seeded in bulk --------------------------------------------------------------


def _tiny_cifar(data: Path, cache_dir: Path) -> Path:
    """30 train and 10 test images per class from the real JPEGs (as tests/conftest.py's tiny_cifar)."""
    out = cache_dir / "cifar10-tiny-400.tar.gz"
    if out.exists():
        return out
    if not data.exists():
        raise SystemExit(f"dataset {data} not found; pass --data or set HPARENA_DATASET_PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    want, taken = {"train": 30, "test": 10}, {}
    partial = out.with_suffix(".partial")
    with tarfile.open(data) as src, tarfile.open(partial, "w:gz") as dst:
        for m in src:
            parts = PurePosixPath(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in want:
                continue
            key = (parts[-3], parts[-2])
            if taken.get(key, 0) < want[parts[-3]]:
                taken[key] = taken.get(key, 0) + 1
                dst.addfile(m, src.extractfile(m))
    partial.rename(out)
    return out


def _seed(url: str, args, tag: str, tiny_tar: Path) -> tuple[dict, dict]:
    """The load competition with its teams and finished submissions, and the tiny one for dispatch."""
    os.environ["HPARENA_DATABASE_URL"] = url  # session_scope() in this process
    from app.config import get_settings

    get_settings.cache_clear()
    with session_scope() as s:
        for name in (f"bench-load-{tag}", f"bench-{tag}"):  # queues of their own; any CPU serves them
            put_hardware_class(s, name, HardwareClassIn(device_type="cpu", train_images_per_sec=400.0,
                                                        eval_images_per_sec=1500.0, description="bench"), None)
        comp = create_competition(s, CompetitionCreate(
            slug=f"load-{tag}", title="API load", hardware_class=f"bench-load-{tag}", search_space=SPACE), None)
        tiny = create_competition(s, CompetitionCreate(
            slug=f"tiny-{tag}", title="Dispatch", hardware_class=f"bench-{tag}", search_space=SPACE,
            dataset={"name": "cifar10", "path": str(tiny_tar)}, model={"arch": "resnet18", "width": 8},
            budget={"max_epochs": 1}), None)
        users = c.bulk_teams(s, comp, args.teams, "load")
        (tiny_user,) = c.bulk_teams(s, tiny, 1, "tiny")
        spec = run_spec(comp, TrainConfig.model_validate(CONFIG), 0)
        team_ids, user_ids = zip(*users, strict=True)
        # Generated by the database: 100,000 rows are one statement each, not 100,000 bound parameter sets.
        # Submission i is team i % teams's, 25 s after the one before it; the last one an hour ago.
        s.execute(text("SELECT setseed(0)"))  # the same accuracies and GPU-seconds on every run
        s.execute(text("""
            INSERT INTO submission (competition_id, team_id, user_id, config, status, accuracy, gpu_seconds,
                                    created_at, finished_at)
            SELECT :comp, t.team_id, t.user_id, CAST(:config AS json), :status,
                   round(CAST(0.30 + random() * 0.65 AS numeric), 4), round(CAST(60 + random() * 3540 AS numeric), 1),
                   CAST(:start AS timestamptz) + i * interval '25 seconds',
                   CAST(:start AS timestamptz) + i * interval '25 seconds' + interval '10 minutes'
            FROM generate_series(0, :n - 1) AS i
            JOIN unnest(CAST(:team_ids AS integer[]), CAST(:user_ids AS integer[])) WITH ORDINALITY
                 AS t(team_id, user_id, k) ON t.k = i % :teams + 1
            ORDER BY i"""), {
            "comp": comp.id, "config": json.dumps(spec.config.model_dump(mode="json")), "status": RunStatus.succeeded,
            "start": utcnow() - timedelta(seconds=25 * args.submissions + 3600), "n": args.submissions,
            "team_ids": list(team_ids), "user_ids": list(user_ids), "teams": len(users)})
        s.execute(text("""
            INSERT INTO run (submission_id, seed, spec, spec_hash, queue, status, attempts, progress, accuracy,
                             gpu_seconds, created_at, started_at, finished_at)
            SELECT id, 0, CAST(:spec AS json), :spec_hash, :queue, status, 1, 1.0, accuracy, gpu_seconds,
                   created_at, created_at, finished_at
            FROM submission WHERE competition_id = :comp"""), {
            "spec": json.dumps(spec.model_dump(mode="json")), "spec_hash": spec.identity(),
            "queue": get_settings().queue_for(comp.hardware_class), "comp": comp.id})
        rebuild_best(s, comp.id)
        # Each team's count, as create_submission keeps it (migration 0006 backfills it the same way).
        s.execute(text("UPDATE team SET submissions = (SELECT count(*) FROM submission "
                       "WHERE submission.team_id = team.id) WHERE competition_id = :comp"), {"comp": comp.id})
        load = {"slug": comp.slug, "id": comp.id, "tokens": [f"bench-load-{i}" for i in range(len(users))]}
        tiny_info = {"slug": tiny.slug, "hardware_class": tiny.hardware_class, "token": "bench-tiny-0",
                     "user_id": tiny_user[1]}
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
        conn.execute(text("CHECKPOINT"))  # the bulk load's dirty pages written now, not while timing
    engine.dispose()
    return load, tiny_info


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- (a) the leaderboard ----------------------------------------------------------------------------------


def _window_board(s, competition_id: int) -> list[tuple]:
    """The baseline: leaderboard() as it ranked before team_best (0006), every submission on every request."""
    order = (Submission.accuracy.desc(), Submission.gpu_seconds.asc(), Submission.created_at.asc(),
             Submission.id.asc())
    best = (select(Submission.id, Submission.team_id, Submission.accuracy, Submission.gpu_seconds,
                   Submission.created_at, func.row_number().over(partition_by=Submission.team_id, order_by=order)
                   .label("nth"))
            .where(Submission.competition_id == competition_id, Submission.status == RunStatus.succeeded)
            .subquery())
    counts = (select(Submission.team_id, func.count(Submission.id).label("n"))
              .where(Submission.competition_id == competition_id).group_by(Submission.team_id).subquery())
    ranked = (select(func.rank().over(order_by=(best.c.accuracy.desc(), best.c.gpu_seconds.asc(),
                                                best.c.created_at.asc(), best.c.id.asc())).label("rank"),
                     Team.name, best.c.team_id, best.c.id, best.c.accuracy, best.c.gpu_seconds / 3600.0,
                     counts.c.n, best.c.created_at)
              .join(Team, Team.id == best.c.team_id).join(counts, counts.c.team_id == best.c.team_id)
              .where(best.c.nth == 1).order_by("rank"))
    return [tuple(r) for r in s.execute(ranked)]


def _board(base: str, load: dict, n: int) -> list[list]:
    with session_scope() as s:
        # The baseline has no device_mismatch flag (none of the seeded rows has one).
        old = _window_board(s, load["id"])
        new = [tuple(v for k, v in e.items() if k != "device_mismatch") for e in leaderboard(s, load["id"])]
        same = old == new
        old_ms = _time_ms(lambda: _window_board(s, load["id"]), 20)
        new_ms = _time_ms(lambda: leaderboard(s, load["id"]), 20)
    with httpx.Client(base_url=base, timeout=30) as http:
        path = f"/api/competitions/{load['slug']}/leaderboard"
        entries = len(http.get(path).json()["entries"])
        for _ in range(20):  # warm both API processes' pools and caches
            http.get(path)
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            r = http.get(path)
            lat.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
    size = len(r.content) / 1024
    print(f"(a) leaderboard: {entries} entries ({size:.0f} KiB of JSON) over {n} sequential GETs; the SQL alone "
          f"in-process: {_pct(old_ms, 50):.1f} ms before 0006 (window over every submission) vs "
          f"{_pct(new_ms, 50):.1f} ms now (team_best), median of 20; same ranking: {same}")
    print(f"    RATIO SQL before/now = {_pct(old_ms, 50) / _pct(new_ms, 50):.1f}x")
    p99 = _pct(lat, 99)
    return [["board GET p50 (ms)", _pct(lat, 50), "", ""],
            ["board GET p99 (ms)", p99, f"< {BOARD_P99_MS:g}", c.verdict(p99 < BOARD_P99_MS)],
            ["board SQL before/now (ms)", f"{_pct(old_ms, 50):.1f} / {_pct(new_ms, 50):.1f}", "", ""],
            ["board same as before 0006", str(same), "True", c.verdict(same)]]


# ---- (b) intake -------------------------------------------------------------------------------------------


def _intake(base: str, load: dict, clients: int, seconds: float) -> list[list]:
    path = f"/api/competitions/{load['slug']}/submissions"
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[int]] = [[] for _ in range(clients)]
    start, stop_at = threading.Barrier(clients + 1), [0.0]

    def client(i: int) -> None:
        headers = {"Authorization": f"Bearer {load['tokens'][i]}"}
        with httpx.Client(base_url=base, timeout=30, headers=headers) as http:
            http.get("/api/health")
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                r = http.post(path, json={"config": CONFIG})
                if r.status_code == 201:
                    lat[i].append(1000 * (time.perf_counter() - t))
                else:
                    errors[i].append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ok = [x for xs in lat for x in xs]
    failed = [x for xs in errors for x in xs]
    rate = len(ok) / elapsed
    print(f"(b) intake: {clients} clients for {elapsed:.1f} s: {len(ok):,} created, {len(failed)} refused "
          f"{sorted(set(failed)) or ''}")
    return [["intake (submissions/s)", rate, f">= {INTAKE_PER_S:g}", c.verdict(rate >= INTAKE_PER_S)],
            ["intake POST p50 (ms)", _pct(ok, 50), "", ""],
            ["intake POST p99 (ms)", _pct(ok, 99), "", ""],
            ["intake refused", len(failed), "0", c.verdict(not failed)]]


# ---- (c) dispatch -----------------------------------------------------------------------------------------


def _dispatch(base: str, tiny: dict, n: int, worker_log: Path) -> list[list]:
    headers = {"Authorization": f"Bearer {tiny['token']}"}
    path = f"/api/competitions/{tiny['slug']}/submissions"
    waits = []
    with httpx.Client(base_url=base, timeout=30, headers=headers) as http:
        for i in range(n + 1):  # the first one warms the worker (dataset packing, first model): not counted
            r = http.post(path, json={"config": CONFIG})
            r.raise_for_status()
            sid = r.json()["id"]
            detail = _finished(http, sid, 600 if i == 0 else 180, worker_log)
            run = detail["runs"][0]
            if run["status"] != "succeeded":
                print(f"    submission {sid} ended {run['status']}: {run.get('error')}")
            if i and run["started_at"]:
                waits.append(1000 * (datetime.fromisoformat(run["started_at"])
                                     - datetime.fromisoformat(detail["created_at"])).total_seconds())
    print(f"(c) dispatch: POST to claim, each (ms): {', '.join(f'{w:.0f}' for w in waits)}")
    p50, worst = _pct(waits, 50), max(waits, default=float("nan"))
    return [["dispatch p50 (ms)", p50, f"< {DISPATCH_MS:g}", c.verdict(p50 < DISPATCH_MS)],
            ["dispatch worst (ms)", worst, f"< {DISPATCH_MS:g}", c.verdict(worst < DISPATCH_MS)]]


def _finished(http: httpx.Client, sid: int, timeout: float, worker_log: Path) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        detail = http.get(f"/api/submissions/{sid}").json()
        if detail["status"] not in ("queued", "running"):
            return detail
        time.sleep(0.2)
    tail = worker_log.read_text()[-3000:] if worker_log.exists() else "(no worker log)"
    raise SystemExit(f"submission {sid} did not finish within {timeout:.0f} s; worker log tail:\n{tail}")


# ---- numbers ----------------------------------------------------------------------------------------------


def _time_ms(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 300 is the 297th fastest)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(len(xs) * q / 100) - 1))]


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        print(e, file=sys.stderr)
    except Exception:  # a benchmark reports, it does not gate: the trace is the report
        traceback.print_exc()
    sys.exit(0)
