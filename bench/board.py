"""The cached boards at 1,000 teams on a 10,000-image test set: what a landed result costs (one refresh of
app.leaderboard.board) against what a reader pays when the board is served from board_cache, and what every
reader would pay if the boards were recomputed per request.

Setup: a scratch database (a SQLite file in var/bench-cache/, or with --postgres a database of its own on the
local PostgreSQL, dropped at the end), migrated with app.migrate and seeded in bulk in the tables the API
writes (executemany, not the API): one competition with a freeze 1 day ago and a deadline a week away, 1,000
teams of one participant each, each team 1-3 succeeded submissions with --seeds runs each. Every run has
accuracy / private_accuracy / ece / gpu_seconds and a run_logits row whose `correct` is np.packbits of a planted
per-image correctness vector over the whole test set (the logits themselves are left empty: the boards never
read them). Correctness comes from a per-image difficulty shared by every run and a per-team skill (most teams
crowded near the top, as in bench/bands.py), so entries miss the same hard images and the paired bootstrap
has something to pair; each run's accuracies are the means of its own vector over the two halves of
worker.engine.split, the submission's those runs' means. A third of the teams with two or more submissions
mark their two latest final. Then the competition's test_labels row, leaderboard.service.rebuild_best for
team_best, and board.bump, as a landed result leaves things. No baselines (a handful of unranked rows).

(1) Refresh: board.refresh(competition_id, force=True) in this process, --refreshes times: the whole cost
    of one landed result (public, frozen and private boards, each with rank bands over its half, stored as
    board_cache.payload). One more refresh, its steps wrapped in timers and not counted above, splits it into
    the SQL that loads the rows, unpacking the per-image bits, band_ranks, and the rest (Pareto, sorting,
    storing the payload).
(2) Cached: GET /api/competitions/{slug}/leaderboard, anonymous (the frozen public board), one request at a
    time against a real API (app.serve, --api-workers uvicorn workers, rate limits off), after 20 warm-up
    requests: median and p95 of --requests requests. Also timed, in this process: board.cached() alone on
    the fresh cache, i.e. the read and JSON parse of the stored payload that every cached GET starts with.
(3) Recompute per request: the same GET with the cache made stale just before it (board.bump committed from
    this process), --stale-requests times; the API (run with HPARENA_BOARD_STALE_GRACE_SECONDS=0) then
    refreshes inside the request. The blocks of (2)
    alternate with these, so background load hits both.

RATIO = median (3) / median (2): what serving from the cache saves each reader. Target (this bench's own)
>= 50x. Also printed: the response's size and the stored payload's (each API process parses it once per
refresh).

    .venv/bin/python bench/board.py [--quick] [--postgres] [--teams 1000] [--images 10000] [--seeds 1]

Nothing is asserted on time; the script exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from datetime import timedelta

import _common as c
import httpx
import numpy as np
from sqlalchemy import create_engine, insert, select, text

from app import migrate
from app.competitions.models import Competition
from app.competitions.schemas import CompetitionCreate
from app.competitions.service import create_competition
from app.config import get_settings
from app.db import close_engine, session_scope, utcnow
from app.leaderboard import bands, board
from app.leaderboard.models import BoardCache
from app.leaderboard.service import rebuild_best
from app.submissions.models import Run, RunLogits, RunStatus, Submission, TestLabels
from app.submissions.service import run_spec
from worker.engine.config import TrainConfig
from worker.engine.split import public_private_indices
from worker.processes import spawn, stop, wait_http

TARGET = 50.0
CONFIG = {"lr": 0.05, "batch_size": 32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200 teams, fewer requests: checks that the bench works")
    p.add_argument("--postgres", action="store_true",
                   help="a scratch database on the PostgreSQL at HPARENA_BENCH_PG (default: a SQLite file)")
    p.add_argument("--teams", type=int, default=1000)
    p.add_argument("--images", type=int, default=10_000, help="test-set size (each half is half of it)")
    p.add_argument("--seeds", type=int, default=1, help="runs (seeds) per submission")
    p.add_argument("--refreshes", type=int, default=3, help="timed board.refresh calls")
    p.add_argument("--requests", type=int, default=50, help="GETs served from the cache")
    p.add_argument("--stale-requests", type=int, default=5, help="GETs that find the cache stale")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn workers")
    args = p.parse_args()
    if args.quick:
        args.teams, args.refreshes, args.requests, args.stale_requests = 200, 1, 20, 2

    tag = uuid.uuid4().hex[:8]
    work = c.CACHE_DIR / f"board-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    if args.postgres:
        name = f"hparena_bench_board_{tag}"
        url = c.create_pg_database(name)
    else:
        name = str(work / "board.db")
        url = f"sqlite:///{name}"
    api = None
    try:
        t0 = time.perf_counter()
        migrate.upgrade(url)
        comp = _seed(url, args)
        print(f"[setup] {args.teams:,} teams, {comp['submissions']:,} submissions, {comp['runs']:,} runs, "
              f"{args.images:,}-image test set on {url.split(':', 1)[0]} in {time.perf_counter() - t0:.1f} s; "
              f"{c.load_note()}", flush=True)

        refresh_s, parts = _refresh(comp["id"], args.refreshes)
        read_ms = _read(comp["id"], 10)
        with session_scope() as s:
            stored = len(json.dumps(s.scalar(select(BoardCache.payload)
                                             .where(BoardCache.competition_id == comp["id"]))))

        env = {**os.environ, "HPARENA_DATABASE_URL": url, "HPARENA_BROKER_URL": "filesystem://",
               "HPARENA_VAR_DIR": str(work / "var"), "HPARENA_DATA_DIR": str(work / "data"),
               "HPARENA_ADMIN_TOKEN": f"bench-admin-{tag}-{uuid.uuid4().hex}", "HPARENA_DEVICE": "cpu",
               "HPARENA_RATE_LIMIT_ENABLED": "false",
               # No grace for a stale board: (3) measures the request that recomputes it (with the default
               # grace it would be served the previous board while a worker refreshes it).
               "HPARENA_BOARD_STALE_GRACE_SECONDS": "0"}
        port = _free_port()
        api = spawn([sys.executable, "-c", "import sys; from app.serve import serve; "
                     "serve('127.0.0.1', int(sys.argv[1]), int(sys.argv[2]), log_level='warning', access_log=False)",
                     str(port), str(args.api_workers)], work / "api.log", env)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/health")
        cached_ms, stale_ms, size, entries = _requests(base, comp, args.requests, args.stale_requests)

        ratio = c.median(stale_ms) / c.median(cached_ms)
        print()
        print(c.table(["measure", "median", "p95", "n"], [
            ["refresh (s), per landed result", c.median(refresh_s), _pct(refresh_s, 95), len(refresh_s)],
            ["GET from the cache (ms)", c.median(cached_ms), _pct(cached_ms, 95), len(cached_ms)],
            ["GET recomputing (ms)", c.median(stale_ms), _pct(stale_ms, 95), len(stale_ms)],
            ["  its board.cached(), in-process (ms)", c.median(read_ms), _pct(read_ms, 95), len(read_ms)],
        ]))
        print("refresh split (one more call, s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        print(f"response: {entries} entries, {size:,} bytes of JSON; stored payload (all boards; each API "
              f"process parses it once per refresh): {stored:,} bytes; {c.load_note()}")
        print(f"RATIO recompute/cached = {ratio:.1f}x at {args.teams} teams, {args.images:,} images "
              f"(refresh {c.median(refresh_s):.2f} s, cached GET {c.median(cached_ms):.1f} ms; "
              f"target >= {TARGET:.0f}x): {c.verdict(ratio >= TARGET)}")
        shutil.rmtree(work)  # kept, with the API's log, when something went wrong
    finally:
        if api is not None:
            stop(api)
        close_engine(url)
        if args.postgres:
            c.drop_pg_database(name)
        else:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(name + suffix):
                    os.remove(name + suffix)


# ---- database: a scratch one, seeded in bulk ------------------------------------------------------------


def _seed(url: str, args: argparse.Namespace) -> dict:
    """The competition, its teams, their submissions with runs and per-image correctness, team_best, bumped."""
    os.environ["HPARENA_DATABASE_URL"] = url  # session_scope() and board.refresh in this process
    get_settings.cache_clear()
    rng = np.random.default_rng(11)
    now = utcnow()
    seeds = list(range(args.seeds))
    public, private = (np.asarray(h) for h in public_private_indices(args.images))
    difficulty = rng.normal(size=args.images)
    skill = 2.3 - 2.0 * rng.beta(1.0, 4.0, size=args.teams)  # ~60% to ~95%, most near the top

    with session_scope() as s:
        comp = create_competition(s, CompetitionCreate(
            slug=f"board-{uuid.uuid4().hex[:6]}", title="Board bench", seeds=seeds,
            freeze_at=now - timedelta(days=1), deadline=now + timedelta(days=7)), None)
        config = TrainConfig.model_validate(CONFIG)
        specs = [run_spec(comp, config, seed) for seed in seeds]
        queue = get_settings().queue_for(comp.hardware_class)
        teams = c.bulk_teams(s, comp, args.teams, "board")

        subs, runs, bits = [], [], []
        for t, (team_id, user_id) in enumerate(teams):
            n = int(rng.integers(1, 4))
            final = n >= 2 and t % 3 == 0
            for j in range(n):
                created = now - timedelta(days=10) + timedelta(seconds=float(rng.uniform(0, 10 * 86400 - 3600)))
                sub_skill = skill[t] + rng.normal(0, 0.08)
                hits = (sub_skill + rng.normal(0, 0.05, size=(len(seeds), 1)) - difficulty[None, :]
                        + rng.normal(0, 0.6, size=(len(seeds), args.images))) > 0
                pub, priv = hits[:, public].mean(axis=1), hits[:, private].mean(axis=1)
                ece = rng.uniform(0.01, 0.08, size=(len(seeds), 2))
                gpu = rng.uniform(60, 3600, size=len(seeds))
                finished = created + timedelta(minutes=10)
                subs.append({
                    "competition_id": comp.id, "team_id": team_id, "user_id": user_id,
                    "config": config.model_dump(mode="json"), "status": RunStatus.succeeded,
                    "accuracy": float(pub.mean()), "accuracy_std": _std(pub), "ece": float(ece[:, 0].mean()),
                    "private_accuracy": float(priv.mean()), "private_accuracy_std": _std(priv),
                    "private_ece": float(ece[:, 1].mean()), "gpu_seconds": float(gpu.sum()),
                    "charged_seconds": float(gpu.sum()), "predicted_seconds": float(gpu.sum()),
                    "final": final and j >= n - 2, "final_at": finished if final and j >= n - 2 else None,
                    "created_at": created, "finished_at": finished})
                runs.append([{
                    "seed": seed, "spec": specs[i], "spec_hash": specs[i].identity(), "queue": queue,
                    "status": RunStatus.succeeded, "attempts": 1, "progress": 1.0,
                    "accuracy": float(pub[i]), "private_accuracy": float(priv[i]), "ece": float(ece[i, 0]),
                    "private_ece": float(ece[i, 1]), "gpu_seconds": float(gpu[i]),
                    "charged_seconds": float(gpu[i]), "created_at": created, "started_at": created,
                    "finished_at": finished} for i, seed in enumerate(seeds)])
                bits.append([np.packbits(row).tobytes() for row in hits])

        sub_ids = s.scalars(insert(Submission).returning(Submission.id, sort_by_parameter_order=True), subs).all()
        flat = [{**r, "submission_id": sid} for sid, rs in zip(sub_ids, runs, strict=True) for r in rs]
        run_ids = s.scalars(insert(Run).returning(Run.id, sort_by_parameter_order=True), flat).all()
        flat_bits = [b for bs in bits for b in bs]
        s.execute(insert(RunLogits), [{"run_id": rid, "rows": args.images, "cols": 10, "dtype": "float16",
                                       "data": b"", "correct": b} for rid, b in zip(run_ids, flat_bits, strict=True)])
        s.add(TestLabels(competition_id=comp.id, rows=args.images,
                         data=rng.integers(0, 10, size=args.images, dtype=np.uint8).tobytes()))
        s.execute(text("UPDATE team SET submissions = (SELECT count(*) FROM submission "
                       "WHERE submission.team_id = team.id) WHERE competition_id = :comp"), {"comp": comp.id})
        rebuild_best(s, comp.id)
        board.bump(s, comp.id)
        info = {"id": comp.id, "slug": comp.slug, "submissions": len(sub_ids), "runs": len(run_ids)}
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:  # statistics as autovacuum (or a long-lived SQLite file) would have them
        conn.execute(text("VACUUM ANALYZE" if url.startswith("postgresql") else "ANALYZE"))
    engine.dispose()
    return info


def _std(xs: np.ndarray) -> float | None:
    return float(np.std(xs, ddof=1)) if xs.size > 1 else None


# ---- (1) refresh ----------------------------------------------------------------------------------------


def _refresh(competition_id: int, rounds: int) -> tuple[list[float], dict[str, float]]:
    """Seconds of each forced refresh, and one more split by phase (its functions wrapped with a timer)."""
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        payload = board.refresh(competition_id, force=True)
        times.append(time.perf_counter() - t)
        assert payload is not None
        print(f"[refresh {r + 1}] {times[-1]:.2f} s; {c.load_note()}", flush=True)
    spent = {"rows SQL": 0.0, "unpack": 0.0, "band_ranks": 0.0}
    originals = {"rows SQL": (board, "_rows"), "unpack": (board, "_matrix"), "band_ranks": (bands, "band_ranks")}

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    saved = {k: getattr(mod, attr) for k, (mod, attr) in originals.items()}
    for k, (mod, attr) in originals.items():
        setattr(mod, attr, timed(k, saved[k]))
    try:
        t = time.perf_counter()
        board.refresh(competition_id, force=True)
        total = time.perf_counter() - t
    finally:
        for k, (mod, attr) in originals.items():
            setattr(mod, attr, saved[k])
    return times, {"total": total, **spent, "rest (Pareto, sort, store)": total - sum(spent.values())}


def _read(competition_id: int, n: int) -> list[float]:
    """Milliseconds of board.cached() on a fresh cache in this process: the read (and JSON parse) of the stored
    payload that every cached GET starts with, before view() and the response model."""
    out = []
    with session_scope() as s:
        comp = s.get(Competition, competition_id)
        for _ in range(n):
            t = time.perf_counter()
            _, stale = board.cached(s, comp)
            out.append(1000 * (time.perf_counter() - t))
            assert not stale
    return out


# ---- (2), (3) the GET, cached and stale -----------------------------------------------------------------


def _requests(base: str, comp: dict, n_cached: int, n_stale: int) -> tuple[list[float], list[float], int, int]:
    path = f"/api/competitions/{comp['slug']}/leaderboard"
    cached, stale = [], []
    blocks = max(1, n_stale)
    with httpx.Client(base_url=base, timeout=300) as http:
        for _ in range(20):  # both API processes: pools, imports, first JSON
            http.get(path).raise_for_status()
        for b in range(blocks):
            start = len(cached)
            for _ in range(n_cached // blocks + (b < n_cached % blocks)):
                t = time.perf_counter()
                r = http.get(path)
                cached.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
                if r.json()["stale"]:
                    raise SystemExit("a cached GET was served stale: something else is refreshing this board")
            size, entries = len(r.content), len(r.json()["entries"])
            if b < n_stale:
                with session_scope() as s:
                    board.bump(s, comp["id"])
                t = time.perf_counter()
                r = http.get(path)
                stale.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
                if r.json()["stale"]:
                    raise SystemExit("a stale GET did not refresh the board (another refresh held the claim)")
                print(f"[block {b + 1}] cached GET median {c.median(cached[start:]):.1f} ms; "
                      f"recomputing GET {stale[-1]:.0f} ms; {c.load_note()}", flush=True)
    return cached, stale, size, entries


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(len(xs) * q / 100) - 1))] if xs else float("nan")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        print(e, file=sys.stderr)
    except Exception:  # a benchmark reports, it does not gate: the trace is the report
        traceback.print_exc()
    sys.exit(0)
