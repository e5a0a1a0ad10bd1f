"""Chaos on real processes: one uvicorn API, two Celery workers, a Redis and a PostgreSQL of the test's own.

Each test posts 50 submissions (5 teams x 10) of a tiny competition over HTTP, injects one fault while
they train, and then checks the same invariants on the database: every submission finished and
succeeded, one result and one curve per run, no attempt beyond the limit, one leaderboard row per team,
and as many submissions as were meant (a retried POST made none twice). The figures (time to drain,
attempts, recovery after the fault) are printed (`pytest -s`) and written into every assertion message.

The faults: SIGKILL a whole worker mid-run; restart Redis empty; stop PostgreSQL for 10 s; SIGKILL the
API while submissions are being posted.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from app.submissions.models import Run, RunStatus
from tests.e2e.chaos import (
    ADMIN,
    PER_TEAM,
    TEAMS,
    TERMINAL_STATES,
    Posted,
    Stack,
    all_retaken,
    arena,
    check_invariants,
    first_after,
    post_submission,
    running_runs,
    submit_all,
)
from tests.e2e.services import PgCluster, RedisServer, free_port, pg_bindir
from tests.factories import cpu_class

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


# ----------------------------------------------------------------------------------------------------
# Servers of the test's own
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the chaos tests need a Redis of their own to restart")
    server = RedisServer(tmp_path / "redis.log")
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def pg_cluster():
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("initdb/pg_ctl not found (PATH or /usr/lib/postgresql/*/bin): the chaos tests need a "
                    "PostgreSQL cluster of their own to stop")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses root and can't be run as postgres")
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# ----------------------------------------------------------------------------------------------------
# The stack: API + two workers on those servers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path, tiny_cifar, redis_server, pg_cluster):
    from app import migrate

    db_url = pg_cluster.create_database("hparena")
    migrate.upgrade(db_url)
    hw = f"chaos{uuid.uuid4().hex[:6]}"
    cpu_class(db_url, hw)
    port = free_port()
    env = {
        **os.environ,
        "HPARENA_DATABASE_URL": db_url,
        "HPARENA_BROKER_URL": redis_server.url,
        "HPARENA_VAR_DIR": str(tmp_path / "var"),
        "HPARENA_DATA_DIR": str(tmp_path / "data"),
        "HPARENA_ADMIN_TOKEN": ADMIN["Authorization"].split()[1],
        "HPARENA_HARDWARE_CLASS": hw,
        "HPARENA_DEVICE": "cpu",
        "HPARENA_HEARTBEAT_SECONDS": "1",
        # As in test_stack: well above the heartbeat, so a live run on a loaded machine is never swept.
        "HPARENA_STALE_AFTER_SECONDS": "15",
        "HPARENA_SWEEP_SECONDS": "1",
        "HPARENA_RATE_LIMIT_ENABLED": "false",
        # Two workers share two cores: one thread each (their share, as a cpuset of one core each would give).
        "HPARENA_WORKER_THREADS": "1",
    }
    engine = create_engine(db_url, pool_pre_ping=True)
    s = Stack(url=f"http://127.0.0.1:{port}", port=port, db_url=db_url, env=env, logs=tmp_path, redis=redis_server,
              pg=pg_cluster, tiny=tiny_cifar, engine=engine)
    try:
        s.start_api()
        s.start_worker("w1")
        s.start_worker("w2")
        s.until(lambda: len(httpx.get(f"{s.url}/api/admin/workers", headers=ADMIN).json()["workers"]) == 2,
                120, "both workers to announce themselves")
        yield s
    finally:
        s.stop_all()
        engine.dispose()


# ----------------------------------------------------------------------------------------------------
# The faults
# ----------------------------------------------------------------------------------------------------


def test_worker_killed_mid_run(stack):
    """SIGKILL one worker's whole process group while it trains. Its unacked token dies with it (Redis
    would redeliver only after the 12 h visibility timeout); the other worker's sweep sees the stale
    heartbeat, requeues the run, and trains it with the rest: one result, attempt 2."""
    stack.figures["test"] = "worker killed"
    a = arena(stack)
    t0 = time.time()
    posted = submit_all(stack, a)

    _, host = stack.training()
    name = host.split("@")[0]
    stack.kill_worker(name)
    t_kill = time.time()
    lost = running_runs(stack, Run.worker_hostname == host)
    stack.figures.update(killed=name, lost_runs=sorted(lost))
    assert lost, f"{name}'s run finished before the kill landed; nothing was lost ({stack.figures})"

    # The stale window (15 s) plus a sweep: two minutes is generous.
    stack.until(all_retaken(stack, lost), 120, f"the lost runs {sorted(lost)} to be retaken by the other worker")
    stack.figures["recovery_s"] = round(time.time() - t_kill, 1)
    stack.figures["drain_s"] = round(stack.wait_drained(TEAMS * PER_TEAM, t0), 1)

    check_invariants(stack, a, posted)
    with stack.engine.connect() as c:
        rows = c.execute(select(Run.id, Run.attempts, Run.worker_hostname).where(Run.id.in_(lost))).all()
    for rid, attempts, worker in rows:
        assert attempts == 2 and not worker.startswith(f"{name}@"), (rid, attempts, worker, stack.figures)
    expected = {1: TEAMS * PER_TEAM - len(lost), 2: len(lost)}
    assert stack.figures["attempts"] == expected, f"only the lost run(s) should need attempt 2: {stack.figures}"


def test_redis_restarted_empty(stack):
    """Kill Redis while runs are queued and running and start a fresh, empty one on the same port ten
    seconds later: every token in it is gone. The database still knows what is queued; the workers'
    reconciler (app.dispatch.reconcile, from their beat) must publish tokens again, and everything
    trains once."""
    stack.figures["test"] = "redis restarted"
    a = arena(stack)
    t0 = time.time()
    posted = submit_all(stack, a)

    stack.until(lambda: stack.status_counts().get(RunStatus.succeeded, 0) >= 4, 300, "a few runs to finish")
    stack.training()
    stack.redis.kill()
    t_kill = time.time()
    time.sleep(10)
    stack.redis.start()
    t_back = time.time()
    stack.figures.update(broker_down_s=round(t_back - t_kill, 1),
                         queued_at_restart=stack.status_counts().get(RunStatus.queued, 0))

    stack.figures["recovery_s"] = round(first_after(
        stack, Run.started_at, t_back, 120,
        "a run to be claimed after Redis came back empty (are tokens republished for queued runs?)"), 1)
    stack.figures["drain_s"] = round(stack.wait_drained(TEAMS * PER_TEAM, t0), 1)
    check_invariants(stack, a, posted)


def test_postgres_stopped_for_ten_seconds(stack):
    """Stop PostgreSQL (fast shutdown: every connection cut) while runs write their epochs, start it
    again ten seconds later. A run whose writes failed stays running on its worker, and that worker's
    next token retakes it at once (claim_next: a run left running on this very worker), well before the
    sweep would find it stale. The API and the workers reconnect by themselves."""
    stack.figures["test"] = "postgres stopped"
    a = arena(stack)
    t0 = time.time()
    posted = submit_all(stack, a)

    stack.training()
    in_flight = running_runs(stack)
    stack.pg.stop()
    t_stop = time.time()
    time.sleep(10)
    stack.pg.start()
    t_back = time.time()
    stack.figures.update(db_down_s=round(t_back - t_stop, 1), in_flight_at_stop=sorted(in_flight))

    stack.figures["recovery_s"] = round(first_after(stack, Run.finished_at, t_back, 120,
                                                     "a run to finish after PostgreSQL came back"), 1)

    def in_flight_over():
        with stack.engine.connect() as c:
            over = c.scalar(select(func.count()).select_from(Run).where(Run.id.in_(in_flight),
                                                                        Run.status.in_(TERMINAL_STATES)))
            return over == len(in_flight)

    stack.until(in_flight_over, 120, f"the runs in flight at the stop {sorted(in_flight)} to finish")
    stack.figures["in_flight_done_s"] = round(time.time() - t_back, 1)
    stack.figures["drain_s"] = round(stack.wait_drained(TEAMS * PER_TEAM, t0), 1)
    check_invariants(stack, a, posted)


def test_api_restarted_mid_storm(stack):
    """SIGKILL the API while five clients post submissions and start it again on the same port. The
    clients retry every unanswered POST with its Idempotency-Key: a request the dead API had committed
    is answered with that submission, one it had not is made now. Nothing is lost, nothing doubled.
    Then every post answered before the kill is sent again, as a client unsure of its answer would: the
    new API process replays each one."""
    stack.figures["test"] = "api restarted"
    a = arena(stack)
    posted = Posted()
    t0 = time.time()
    storm = threading.Thread(target=submit_all, args=(stack, a, posted))
    storm.start()

    stack.until(lambda: len(posted.ids) >= TEAMS * PER_TEAM // 4, 120, "a quarter of the posts to be answered",
                poll=0.02)
    stack.kill_api()
    t_kill = time.time()
    with posted.lock:
        before_kill = dict(posted.sent)
    time.sleep(1)
    stack.start_api()
    stack.figures.update(answered_before_kill=len(before_kill), api_down_s=round(time.time() - t_kill, 1))
    storm.join()
    stack.figures.update(posted_s=round(time.time() - t0, 1), cut=posted.cut, refused=posted.refused,
                         replayed_in_storm=posted.replayed)
    assert posted.cut + posted.refused > 0, f"no POST met the dead API: the fault missed the storm {stack.figures}"

    replayed_before = posted.replayed
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for key, (team, body, sid) in before_kill.items():
            r = post_submission(http, a, team, body, key, posted, time.time() + 60)
            assert r is not None and r.json()["id"] == sid, (key, sid, r and r.text, stack.figures)
    stack.figures["replayed_after_restart"] = posted.replayed - replayed_before
    assert stack.figures["replayed_after_restart"] == len(before_kill), stack.figures

    stack.figures["drain_s"] = round(stack.wait_drained(TEAMS * PER_TEAM, t0), 1)
    check_invariants(stack, a, posted)
