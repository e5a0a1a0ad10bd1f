"""The whole path with real processes: uvicorn API + Celery worker (prefork) + a real broker + a real DB.

Two stacks: the embedded default (kombu filesystem broker, SQLite) and production's (Redis at
127.0.0.1:6379, PostgreSQL). Submit over HTTP, the worker trains on 300 real CIFAR-10 images, and the
public leaderboard shows the result.
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.e2e.services import wait_for
from tests.factories import cpu_class
from worker.processes import spawn, stop

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

def _wait(predicate, timeout, what, logs):
    return wait_for(predicate, timeout, what, logs / "worker.log")


def _first_epoch(http: httpx.Client, stack: dict, student: dict, sid: int) -> dict:
    def written():
        run = http.get(f"/api/submissions/{sid}", headers=student).json()["runs"][0]
        return run if run["epochs"] else None

    return _wait(written, 300, "the first epoch", stack["logs"])


def _finished(http: httpx.Client, stack: dict, student: dict, sid: int, timeout: float = 600) -> dict:
    def done():
        d = http.get(f"/api/submissions/{sid}", headers=student).json()
        return d if d["status"] not in ("queued", "running") else None

    return _wait(done, timeout, f"submission {sid} to finish", stack["logs"])


def _board_fresh() -> bool:
    """The cached boards of competition e2e reflect its latest change (read from the stack's database)."""
    engine = create_engine(os.environ["HPARENA_DATABASE_URL"])
    try:
        with engine.connect() as c:
            row = c.execute(text("SELECT b.version, b.computed_version FROM board_cache b JOIN competition c "
                                 "ON c.id = b.competition_id WHERE c.slug = 'e2e'")).first()
    finally:
        engine.dispose()
    return row is not None and row[0] > 0 and row[0] == row[1]


def test_submission_goes_through_a_real_worker_onto_the_leaderboard(stack):
    admin = {"Authorization": "Bearer e2e-admin-token"}
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=admin).json()["token"]}
        comp = {"slug": "e2e", "title": "e2e", "hardware_class": stack["hw"], "seeds": [0, 1],
                "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
                "budget": {"max_epochs": 2}}
        assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
        token = http.post("/api/competitions/e2e/join", json={"name": "s", "team": "owls"}).json()["token"]
        student = {"Authorization": f"Bearer {token}"}
        t0 = time.time()
        r = http.post("/api/competitions/e2e/submissions", json={"config": {"batch_size": 32, "lr": 0.05}},
                      headers=student)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

        # The fleet shows the worker, busy or idle, on its own queue.
        fleet = _wait(lambda: http.get("/api/admin/workers", headers=admin).json()["workers"] or None, 60,
                      "the worker to announce itself", stack["logs"])
        assert fleet[0]["hostname"].startswith(stack["hw"]) and f"train.{stack['hw']}" in fleet[0]["queues"]

        detail = _finished(http, stack, student, sid, timeout=240)
        elapsed = time.time() - t0
        assert detail["status"] == "succeeded", detail
        for run in detail["runs"]:
            assert run["worker_hostname"].startswith(stack["hw"])
            assert run["device_name"].startswith("CPU")
            assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        # The worker ranks the landed result itself (its parent's board refresher), before anyone asks.
        _wait(_board_fresh, 30, "the worker to refresh the cached board", stack["logs"])
        board = http.get("/api/competitions/e2e/leaderboard").json()["entries"]
        assert board[0]["team"] == "owls" and board[0]["submission_id"] == sid
        assert board[0]["accuracy"] == pytest.approx(detail["accuracy"])
        print(f"\nsubmit -> leaderboard: {elapsed:.1f} s")

        # Workers drained the queue: nothing left queued in the DB, and the broker empties too (a spare
        # token the reconciler sent while another was in a worker's hands is taken by the idle worker).
        def queue():
            return {x["queue"]: x for x in http.get("/api/admin/workers", headers=admin).json()["queues"]
                    }[f"train.{stack['hw']}"]

        assert queue()["queued_runs"] == 0
        _wait(lambda: queue()["broker_messages"] == 0, 30, "the broker to empty", stack["logs"])

        # The live API's /metrics shows both runs: finished, timed, and no longer queued.
        m = {(x.name, frozenset(x.labels.items())): x.value
             for f in text_string_to_metric_families(http.get("/metrics").text) for x in f.samples}
        ok = {("hardware_class", stack["hw"]), ("state", "succeeded")}
        assert m[("hparena_runs", frozenset(ok))] == 2
        assert m[("hparena_run_duration_seconds_count", frozenset(ok))] == 2
        assert m[("hparena_run_duration_seconds_sum", frozenset(ok))] > 0
        assert m[("hparena_run_device_seconds_count", frozenset(ok))] == 2
        assert m[("hparena_run_images_per_second_count", frozenset({("hardware_class", stack["hw"])}))] == 2
        assert m[("hparena_queue_depth", frozenset({("queue", f"train.{stack['hw']}"),
                                                    ("hardware_class", stack["hw"])}))] == 0
        ages = [v for (name, labels), v in m.items() if name == "hparena_worker_heartbeat_age_seconds"
                and ("hardware_class", stack["hw"]) in labels]
        assert len(ages) == 1 and 0 <= ages[0] < 60
        assert m[("hparena_http_request_duration_seconds_count", frozenset(
            {("method", "GET"), ("route", "/api/submissions/{submission_id}"), ("status", "200")}))] >= 1


ADMIN = {"Authorization": "Bearer e2e-admin-token"}


def _long_submission(http: httpx.Client, stack: dict, slug: str, epochs: int = 30) -> tuple[dict, int]:
    """A competition whose one run trains `epochs` short epochs, and a submission to it: (student headers,
    id)."""
    org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                  headers=ADMIN).json()["token"]}
    comp = {"slug": slug, "title": slug, "hardware_class": stack["hw"], "seeds": [0],
            "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
            "budget": {"max_epochs": epochs}}
    assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
    token = http.post(f"/api/competitions/{slug}/join", json={"name": "s", "team": "t"}).json()["token"]
    student = {"Authorization": f"Bearer {token}"}
    r = http.post(f"/api/competitions/{slug}/submissions", json={"config": {"batch_size": 32, "epochs": epochs}},
                  headers=student)
    assert r.status_code == 201, r.text
    return student, r.json()["id"]


def test_killed_worker_child_is_replaced_and_the_run_finishes_once(stack):
    """SIGKILL the pool process mid-training: late ack + reject_on_worker_lost bring the message back,
    the worker's new child retakes the run (attempt 2), and exactly one result lands."""
    import signal

    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        student, sid = _long_submission(http, stack, "crash")

        _first_epoch(http, stack, student, sid)
        children = _pool_children(stack)
        assert children, "the prefork pool has no child process"
        for pid in children:
            os.kill(pid, signal.SIGKILL)

        detail = _finished(http, stack, student, sid)
        run = detail["runs"][0]
        assert detail["status"] == "succeeded", detail
        assert run["attempts"] == 2
        assert [e["epoch"] for e in run["epochs"]] == list(range(1, 31))
        board = http.get("/api/competitions/crash/leaderboard").json()["entries"]
        assert len(board) == 1 and board[0]["submission_id"] == sid


def test_whole_worker_lost_its_run_is_swept_back_and_a_new_worker_finishes_it(stack):
    """SIGKILL the worker's whole process group (parent and child): its unacked message is gone with it
    (the filesystem broker never redelivers, Redis only after the visibility timeout). A second worker's
    sweep sees the stale heartbeat, requeues the run and trains it: one result, attempt 2."""
    import signal

    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        student, sid = _long_submission(http, stack, "lost")

        _first_epoch(http, stack, student, sid)
        first = [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        stack["start_worker"]("rescuer")

        detail = _finished(http, stack, student, sid)
        run = detail["runs"][0]
        assert detail["status"] == "succeeded", detail
        assert run["attempts"] == 2 and run["worker_hostname"].startswith("rescuer@")
        assert [e["epoch"] for e in run["epochs"]] == list(range(1, 31))
        states = {w["hostname"].split("@")[0]: w["state"] for w in
                  http.get("/api/admin/workers", headers=ADMIN).json()["workers"]}
        assert states["rescuer"] == "idle"


def _pool_children(stack: dict) -> list[int]:
    import subprocess

    worker = [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]
    out = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out]


def test_native_crashes_in_the_training_child_fail_the_run_with_a_readable_reason(stack):
    """The training child dies from SIGSEGV, then SIGABRT, then SIGABRT again (what a heap corruption in
    oneDNN or a CUDA fault does): each death is recorded by the worker's parent, the run is retaken up to
    the attempt limit, then fails saying why. The worker itself survives and trains the next entry."""
    import signal

    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        student, sid = _long_submission(http, stack, "abort")

        def running_attempt(n: int):
            def check():
                run = http.get(f"/api/submissions/{sid}", headers=student).json()["runs"][0]
                return run if run["status"] == "running" and run["attempts"] == n else None
            return check

        for attempt, sig in enumerate([signal.SIGSEGV, signal.SIGABRT, signal.SIGABRT], start=1):
            _wait(running_attempt(attempt), 180, f"attempt {attempt} to start training", stack["logs"])
            children = _pool_children(stack)
            assert children, "the prefork pool has no child process"
            for pid in children:
                os.kill(pid, sig)

        detail = _finished(http, stack, student, sid)
        run = detail["runs"][0]
        assert detail["status"] == "failed" and run["status"] == "failed", detail
        assert run["attempts"] == 3
        assert "worker lost 3 times" in run["error"], run["error"]
        assert "was aborted by native code" in run["error"] and "signal 6 (SIGABRT)" in run["error"], run["error"]
        assert detail["error"] == run["error"]
        print(f"\nrun error after three native crashes: {run['error']}")

        # The same worker process is still healthy: it trains the next submission to the end.
        r = http.post("/api/competitions/abort/submissions", json={"config": {"batch_size": 32, "epochs": 1}},
                      headers=student)
        assert r.status_code == 201, r.text
        assert _finished(http, stack, student, r.json()["id"])["status"] == "succeeded"


def test_a_worker_on_another_database_leaves_the_message_for_the_right_one(stack, tmp_path):
    """A worker pointed at the wrong database (another deployment's identity) gets the token, refuses it
    and says why, in its log and on its fleet table; the token stays in the broker, and the right worker,
    started later, trains the run."""
    from sqlalchemy import create_engine, text

    from app import migrate

    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        right = [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]
        stop(right)
        wrong_db = f"sqlite:///{tmp_path / 'other-deployment.db'}"
        migrate.upgrade(wrong_db)
        cpu_class(wrong_db, stack["hw"])
        stack["procs"].append(spawn(
            [sys.executable, "-m", "worker.cli", "worker", "--hostname", "wrong@%h"], tmp_path / "wrong.log",
            {**os.environ, "HPARENA_DATABASE_URL": wrong_db, "HPARENA_REFUSE_DELAY_SECONDS": "1"}))
        student, sid = _long_submission(http, stack, "lost-token", epochs=1)

        _wait(lambda: "refused a message from deployment" in (tmp_path / "wrong.log").read_text(), 120,
              "the wrong worker to refuse", tmp_path)
        time.sleep(3)  # it refuses again and again (the token keeps coming back) and never drops it
        assert http.get(f"/api/submissions/{sid}", headers=student).json()["status"] == "queued"
        engine = create_engine(wrong_db)
        with engine.connect() as conn:
            problem = conn.execute(text("SELECT problem FROM worker_node WHERE hostname LIKE 'wrong@%'")).scalar()
        engine.dispose()
        assert "HPARENA_DATABASE_URL" in problem

        stack["start_worker"]("right")
        detail = _finished(http, stack, student, sid, timeout=240)
        assert detail["status"] == "succeeded" and detail["runs"][0]["worker_hostname"].startswith("right@")
        assert detail["runs"][0]["attempts"] == 1
