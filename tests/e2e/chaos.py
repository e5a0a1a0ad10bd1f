"""The harness of the chaos tests (test_chaos.py): a handle on the running stack, the storm of
submissions its clients post (retrying with an Idempotency-Key), and the invariants each test ends with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from app.submissions.models import TERMINAL, EpochMetric, Run, RunStatus, Submission
from tests.e2e.services import PgCluster, RedisServer
from worker.processes import spawn, stop, wait_http

TEAMS, PER_TEAM = 5, 10
MAX_EPOCHS = 2
MAX_ATTEMPTS = 3  # app.config.Settings.max_attempts, left at its default
DRAIN_TIMEOUT = 600.0
ADMIN = {"Authorization": "Bearer chaos-admin-token"}
TERMINAL_STATES = [str(s) for s in TERMINAL]


# ----------------------------------------------------------------------------------------------------
# The stack: API + two workers on the test's own Redis and PostgreSQL
# ----------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The running stack as a test drives it: its processes, its servers, its database (read directly),
    and the figures the test collects for its report."""

    url: str
    port: int
    db_url: str
    env: dict[str, str]
    logs: Path
    redis: RedisServer
    pg: PgCluster
    tiny: Path
    engine: Engine
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)

    # -- processes ------------------------------------------------------------------------------------

    def start_api(self) -> None:
        self.api = spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(self.port)],
                         self.logs / "api.log", self.env)
        wait_http(f"{self.url}/api/health")

    def kill_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def start_worker(self, name: str) -> None:
        self.workers[name] = spawn([sys.executable, "-m", "worker.cli", "worker", "--hostname", f"{name}@%h"],
                                   self.logs / f"{name}.log", self.env)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group: the Celery parent and its training child at once."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in [*self.workers.values(), *([self.api] if self.api else [])]:
            stop(proc)

    # -- reading the database ---------------------------------------------------------------------------

    def until(self, predicate, timeout: float, what: str, poll: float = 0.25):
        """Poll `predicate` until it returns something truthy; a database or API that is down (the fault
        itself) counts as not yet."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = predicate()
            except (OperationalError, httpx.TransportError):
                value = None
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnosis()}")

    def status_counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return dict(c.execute(select(Submission.status, func.count()).group_by(Submission.status)).all())

    def wait_drained(self, expected: int, t0: float) -> float:
        """Every submission terminal: returns seconds since t0."""
        def drained():
            counts = self.status_counts()
            return sum(counts.values()) == expected and all(s in TERMINAL_STATES for s in counts)

        self.until(drained, DRAIN_TIMEOUT - (time.time() - t0), f"all {expected} submissions to finish", poll=0.5)
        return time.time() - t0

    def training(self) -> tuple[int, str]:
        """A run that reported its first epoch and not its last: (run id, worker hostname)."""
        def mid_run():
            with self.engine.connect() as c:
                done = select(func.max(EpochMetric.epoch)).where(EpochMetric.run_id == Run.id).scalar_subquery()
                row = c.execute(select(Run.id, Run.worker_hostname).where(
                    Run.status == RunStatus.running, done >= 1, done < MAX_EPOCHS).limit(1)).first()
            return tuple(row) if row else None

        return self.until(mid_run, 300, "a run between its first and last epoch", poll=0.05)

    def diagnosis(self) -> str:
        try:
            counts = self.status_counts()
        except OperationalError as e:
            counts = f"database unreachable: {e.__class__.__name__}"
        tails = []
        for name in ["api", *self.workers]:
            path = self.logs / f"{name}.log"
            if path.exists():
                tails.append(f"--- {name}.log (tail) ---\n{path.read_text(errors='replace')[-2500:]}")
        return f"figures: {self.figures}\nsubmission statuses: {counts}\n" + "\n".join(tails)

    def report(self) -> None:
        print("\n[chaos] " + ", ".join(f"{k}={v}" for k, v in self.figures.items()))


# ----------------------------------------------------------------------------------------------------
# The competition and the storm of submissions
# ----------------------------------------------------------------------------------------------------


@dataclass
class Arena:
    slug: str
    teams: dict[str, dict[str, str]]  # team name -> its student's headers


def arena(stack: Stack, slug: str = "chaos") -> Arena:
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        org = http.post("/api/admin/users", json={"name": "org", "role": "organizer"}, headers=ADMIN)
        assert org.status_code == 201, org.text
        comp = {"slug": slug, "title": slug, "hardware_class": stack.env["HPARENA_HARDWARE_CLASS"], "seeds": [0],
                "dataset": {"name": "cifar10", "path": str(stack.tiny)}, "model": {"width": 8},
                "budget": {"max_epochs": MAX_EPOCHS}}
        r = http.post("/api/competitions", json=comp, headers={"Authorization": f"Bearer {org.json()['token']}"})
        assert r.status_code == 201, r.text
        teams = {}
        for t in range(TEAMS):
            r = http.post(f"/api/competitions/{slug}/join", json={"name": f"student{t}", "team": f"team{t}"})
            assert r.status_code == 201, r.text
            teams[f"team{t}"] = {"Authorization": f"Bearer {r.json()['token']}"}
    return Arena(slug, teams)


@dataclass
class Posted:
    ids: list[int] = field(default_factory=list)
    sent: dict[str, tuple[str, dict, int]] = field(default_factory=dict)  # key -> (team, body, id answered)
    refused: int = 0  # tries that found no API listening
    cut: int = 0  # tries sent whose answer never came (the API died holding them) or came as a 5xx
    replayed: int = 0  # answers that were an earlier try's submission (Idempotent-Replayed)
    lost: list[str] = field(default_factory=list)  # posts that never got a 201 within the deadline
    errors: list[BaseException] = field(default_factory=list)  # a client thread's failure (a refused post)
    lock: threading.Lock = field(default_factory=threading.Lock)


def post_submission(http: httpx.Client, a: Arena, team: str, body: dict, key: str, out: Posted,
                    deadline: float) -> httpx.Response | None:
    """POST one submission, retrying with the same Idempotency-Key until it is answered 201."""
    headers = {**a.teams[team], "Idempotency-Key": key}
    while time.time() < deadline:
        try:
            r = http.post(f"/api/competitions/{a.slug}/submissions", json=body, headers=headers)
        except httpx.ConnectError:
            r, counter = None, "refused"
        except httpx.TransportError:
            r, counter = None, "cut"
        else:
            counter = "cut"
        if r is not None and r.status_code == 201:
            with out.lock:
                out.replayed += r.headers.get("Idempotent-Replayed") == "true"
            return r
        if r is not None and r.status_code < 500 and r.status_code != 409:
            raise AssertionError(f"submission refused: {r.status_code} {r.text}")
        with out.lock:
            setattr(out, counter, getattr(out, counter) + 1)
        time.sleep(0.2)
    with out.lock:
        out.lost.append(key)
    return None


def submit_all(stack: Stack, a: Arena, out: Posted | None = None, timeout: float = 180) -> Posted:
    """Every team posts its PER_TEAM submissions at once (one client thread per team)."""
    out = out or Posted()
    deadline = time.time() + timeout

    def team_posts(team: str) -> None:
        try:
            with httpx.Client(base_url=stack.url, timeout=30) as http:
                for nth in range(PER_TEAM):
                    # No test-time augmentation: it would be a third of a run this small (about 1 s on a core).
                    config = {"batch_size": 32, "lr": round(0.02 + 0.01 * nth, 3), "tta": "none"}
                    key, body = str(uuid.uuid4()), {"config": config}
                    r = post_submission(http, a, team, body, key, out, deadline)
                    if r is not None:
                        with out.lock:
                            out.ids.append(r.json()["id"])
                            out.sent[key] = (team, body, r.json()["id"])
        except BaseException as e:  # reported by the caller's thread (check_invariants)
            out.errors.append(e)

    threads = [threading.Thread(target=team_posts, args=(t,)) for t in a.teams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if out.errors:
        raise out.errors[0]
    return out


# ----------------------------------------------------------------------------------------------------
# The invariants every test ends with
# ----------------------------------------------------------------------------------------------------


def check_invariants(stack: Stack, a: Arena, posted: Posted) -> None:
    figures = stack.figures
    expected = TEAMS * PER_TEAM
    with stack.engine.connect() as c:
        subs = c.execute(select(Submission.id, Submission.status, Submission.error, Submission.idempotency_key,
                                Submission.team_id)).all()
        runs = c.execute(select(Run.id, Run.submission_id, Run.status, Run.attempts, Run.result, Run.accuracy,
                                Run.error)).all()
        epochs = c.execute(select(EpochMetric.run_id, EpochMetric.epoch)).all()
    figures["attempts"] = dict(sorted(Counter(r.attempts for r in runs).items()))
    stack.report()

    # As many submissions as were meant: a retried POST made nothing twice, and none was lost.
    assert not posted.errors, f"a client failed: {posted.errors!r}; {figures}"
    assert not posted.lost, f"{len(posted.lost)} posts never got a 201; {figures}"
    assert len(posted.ids) == expected and len(set(posted.ids)) == expected, f"posted ids {posted.ids}; {figures}"
    assert sorted(s.id for s in subs) == sorted(posted.ids), f"{len(subs)} submissions in the database; {figures}"
    assert sorted(s.idempotency_key for s in subs) == sorted(posted.sent), f"idempotency keys differ; {figures}"

    # Every submission finished, and succeeded.
    failed = {s.id: (s.status, s.error) for s in subs if s.status != RunStatus.succeeded}
    assert not failed, f"{len(failed)} submissions did not succeed: {failed}; {figures}"

    # One run per submission (one seed), each with exactly one result, within the attempt limit.
    assert len(runs) == expected and len({r.submission_id for r in runs}) == expected, f"{len(runs)} runs; {figures}"
    over = {r.id: r.attempts for r in runs if not 1 <= r.attempts <= MAX_ATTEMPTS}
    assert not over, f"runs outside 1..{MAX_ATTEMPTS} attempts: {over}; {figures}"
    for r in runs:
        assert r.status == RunStatus.succeeded, f"run {r.id}: {r.status} {r.error}; {figures}"
        assert r.result is not None and r.accuracy is not None, f"run {r.id} succeeded without a result; {figures}"
        assert r.result["epochs_completed"] == MAX_EPOCHS and len(r.result["history"]) == MAX_EPOCHS, (
            f"run {r.id}: result has {r.result['epochs_completed']} epochs; {figures}")

    # One curve per run: no epoch twice (the unique constraint says so; the rows say so too), every epoch.
    uniques = {tuple(u["column_names"]) for u in inspect(stack.engine).get_unique_constraints("epoch_metric")}
    assert ("run_id", "epoch") in uniques, f"epoch_metric lost its unique (run_id, epoch): {uniques}"
    twice = {k: n for k, n in Counter((e.run_id, e.epoch) for e in epochs).items() if n > 1}
    assert not twice, f"duplicate epoch rows (run, epoch): count {twice}; {figures}"
    curves: dict[int, list[int]] = {}
    for e in epochs:
        curves.setdefault(e.run_id, []).append(e.epoch)
    wrong = {r.id: sorted(curves.get(r.id, [])) for r in runs if sorted(curves.get(r.id, [])) != list(
        range(1, MAX_EPOCHS + 1))}
    assert not wrong, f"runs whose epoch rows are not 1..{MAX_EPOCHS}: {wrong}; {figures}"

    # The public leaderboard counts each team once.
    board = httpx.get(f"{stack.url}/api/competitions/{a.slug}/leaderboard", timeout=30).json()["entries"]
    names = [e["team"] for e in board]
    assert len(board) == TEAMS and sorted(names) == sorted(a.teams), f"leaderboard teams {names}; {figures}"
    by_id = {s.id: s.team_id for s in subs}
    assert all(by_id[e["submission_id"]] == e["team_id"] for e in board), f"board {board}; {figures}"

    # Nothing left behind in the fleet's view either.
    fleet = httpx.get(f"{stack.url}/api/admin/workers", headers=ADMIN, timeout=30).json()
    queue = next(q for q in fleet["queues"] if q["queue"] == f"train.{stack.env['HPARENA_HARDWARE_CLASS']}")
    assert queue["queued_runs"] == 0 and queue["running_runs"] == 0, f"{queue}; {figures}"


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def first_after(stack: Stack, column, t: float, timeout: float, what: str) -> float:
    """Seconds from t until some run's `column` (started_at, finished_at) is later than t."""
    def seen():
        with stack.engine.connect() as c:
            return c.scalar(select(func.min(column)).where(column > _utc(t)))

    return stack.until(seen, timeout, what).timestamp() - t


def running_runs(stack: Stack, *where) -> dict[int, int]:
    """Runs running now (on a given worker, say): run id -> attempts."""
    with stack.engine.connect() as c:
        return dict(c.execute(select(Run.id, Run.attempts).where(Run.status == RunStatus.running, *where)).all())


def all_retaken(stack: Stack, runs: dict[int, int]):
    """A predicate: every run in `runs` (id -> attempts when its worker was lost) is on a later attempt."""
    def retaken():
        with stack.engine.connect() as c:
            now = dict(c.execute(select(Run.id, Run.attempts).where(Run.id.in_(runs))).all())
        return all(now[rid] > attempts for rid, attempts in runs.items())
    return retaken
