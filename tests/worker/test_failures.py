"""Typed failures, retries, refunds and time limits, through the Celery task run for real in this process
(`apply`, as a worker's child would run it) on both databases.

The failures are real ones: a precision the CPU can't do, a dataset copy cut off halfway, a dataset path
that is a FIFO nobody writes to (an open of it blocks in the kernel, as on a stalled network mount).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.config import Settings, get_settings
from app.db import session_scope, utcnow
from app.queue import queue_depth
from app.submissions import runs as run_service
from app.submissions.limits import time_limits
from app.submissions.models import EpochMetric, Run
from tests.factories import join, make_competition, make_organizer, submit
from worker.engine.config import Budget


@pytest.fixture
def contest(client, admin_headers, tiny_cifar):
    def make(seeds=(0,), budget=None, **kw):
        org = make_organizer(client, admin_headers)
        kw.setdefault("dataset", {"name": "cifar10", "path": str(tiny_cifar)})
        comp = make_competition(client, org, seeds=list(seeds), budget=budget or {"max_epochs": 2}, **kw)
        return comp, join(client, comp["slug"])
    return make


def _detail(client, sub, student):
    return client.get(f"/api/submissions/{sub['id']}", headers=student).json()


def _wake():
    from worker.tasks import train_run

    return train_run.apply().get()


def _limits_env(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(f"HPARENA_TIME_LIMIT_{name.upper()}", str(value))
    get_settings.cache_clear()


def _cut_in_half(src, dst):
    """A copy of the tarball that stops halfway, as an interrupted sync leaves it."""
    whole = src.read_bytes()
    dst.write_bytes(whole[: len(whole) // 2])
    return whole


# ---- the rule -----------------------------------------------------------------------------------------


def test_time_limits_follow_the_prediction_the_floor_and_the_budget():
    s = Settings(database_url="sqlite://", time_limit_factor=3, time_limit_floor_seconds=300,
                 time_limit_eval_share=0.5, time_limit_grace_seconds=60, time_limit_max_seconds=36000)
    no_cap = Budget(max_epochs=10)

    lim = time_limits(1000, no_cap, s)
    assert (lim.soft_seconds, lim.hard_seconds) == (3000, 3060)
    assert lim.exceeded() == "ran past its time limit of 3000 s (predicted 1000 s × 3)"

    lim = time_limits(20, no_cap, s)  # a short run still gets the floor, which covers set-up
    assert lim.soft_seconds == 300 and lim.basis == "the 300 s floor; predicted 20 s × 3 = 60 s"

    lim = time_limits(1000, Budget(max_epochs=10, max_seconds=200), s)  # 200 + 100 evaluation + 300 set-up
    assert lim.soft_seconds == 600 and "capped at the budget's max_seconds 200 s" in lim.basis

    assert time_limits(None, Budget(max_epochs=10, max_seconds=200), s).soft_seconds == 600
    assert time_limits(None, no_cap, s).soft_seconds == 36000  # no prediction, no cap: the worker's longest
    assert time_limits(10**6, no_cap, s).soft_seconds == 36000
    assert s.task_time_limit_seconds == 36120 < s.visibility_timeout_seconds


# ---- kinds and charges ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_config_failure_is_charged_and_counts_toward_the_quota(client, db, contest):
    comp, student = contest(submission_quota=1)
    sub = submit(client, comp, student, batch_size=32, epochs=1, precision="fp16")  # this worker is a CPU
    assert _wake() == "failed"
    detail = _detail(client, sub, student)
    run = detail["runs"][0]
    assert (detail["status"], detail["failure_kind"], run["failure_kind"]) == ("failed", "config", "config")
    assert "fp16 needs a CUDA device" in run["error"] and run["attempts"] == 1  # the run's doing: not retried
    assert run["charged_seconds"] > 0 and run["charged_seconds"] == pytest.approx(run["wall_seconds"])
    assert detail["charged_seconds"] == pytest.approx(run["charged_seconds"])
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                    headers=student)
    assert r.status_code == 429 and "quota of 1 submissions used" in r.json()["detail"]


@pytest.mark.slow
def test_an_infrastructure_failure_is_retried_and_the_retry_trains(client, db, contest, tmp_path, tiny_cifar):
    data = tmp_path / "cifar10.tar.gz"
    whole = _cut_in_half(tiny_cifar, data)
    comp, student = contest(dataset={"name": "cifar10", "path": str(data)})
    sub = submit(client, comp, student, batch_size=32, epochs=1)
    tokens = queue_depth("train.cpu")
    assert _wake() == "requeued"
    assert queue_depth("train.cpu") == tokens + 1  # the requeued run's own token
    run = _detail(client, sub, student)["runs"][0]
    assert (run["status"], run["attempts"], run["failure_kind"], run["charged_seconds"]) == ("queued", 1, None, None)
    assert run["error"].startswith("attempt 1 of 3 failed for a reason outside the run, so it was requeued: ")
    assert "cannot read the archive" in run["error"]

    data.write_bytes(whole)  # the copy is whole again
    assert _wake() == "succeeded"
    run = _detail(client, sub, student)["runs"][0]
    assert (run["status"], run["attempts"], run["failure_kind"], run["error"]) == ("succeeded", 2, None, None)
    assert run["charged_seconds"] == pytest.approx(run["gpu_seconds"]) and run["gpu_seconds"] > 0


@pytest.mark.slow
def test_an_infrastructure_failure_on_every_attempt_is_refunded(client, db, contest, tmp_path, tiny_cifar):
    data = tmp_path / "cifar10.tar.gz"
    _cut_in_half(tiny_cifar, data)
    comp, student = contest(dataset={"name": "cifar10", "path": str(data)}, submission_quota=1)
    sub = submit(client, comp, student, batch_size=32, epochs=1)
    assert [_wake(), _wake(), _wake(), _wake()] == ["requeued", "requeued", "failed",
                                                    "skipped: no queued run on train.cpu"]
    detail = _detail(client, sub, student)
    run = detail["runs"][0]
    assert (detail["status"], detail["failure_kind"], run["failure_kind"]) == ("failed", "infrastructure",
                                                                              "infrastructure")
    assert run["attempts"] == 3 and run["charged_seconds"] == 0 and detail["charged_seconds"] == 0
    assert run["error"].startswith("failed on all 3 attempts for reasons outside the run (not charged); last: ")
    assert "cannot read the archive" in run["error"]
    submit(client, comp, student, batch_size=32, epochs=1)  # the quota of 1 was refunded with it


@pytest.mark.slow
def test_a_diverged_run_is_a_config_failure_and_is_charged(client, db, contest):
    import torch
    from torch.nn.modules.module import register_module_forward_hook

    calls = {"n": 0}

    def nan_from_the_12th_step(module, _inputs, output):
        """The classifier's output turns NaN from the 12th training forward pass on (a fault in torch's
        numbers, not in our code)."""
        if isinstance(module, torch.nn.Linear) and module.training:
            calls["n"] += 1
            return output * float("nan") if calls["n"] >= 12 else output
        return None

    comp, student = contest(budget={"max_epochs": 3})
    sub = submit(client, comp, student, batch_size=32, epochs=3)
    hook = register_module_forward_hook(nan_from_the_12th_step)
    try:
        assert _wake() == "diverged"
    finally:
        hook.remove()
    detail = _detail(client, sub, student)
    run = detail["runs"][0]
    assert (run["status"], run["failure_kind"], detail["failure_kind"]) == ("diverged", "config", "config")
    assert "NaN" in run["error"] and run["attempts"] == 1
    assert run["charged_seconds"] == pytest.approx(run["gpu_seconds"]) and run["gpu_seconds"] > 0


@pytest.mark.slow
def test_cancel_charges_a_running_run_its_time_so_far_and_a_queued_one_nothing(client, db, contest):
    comp, student = contest(seeds=(0, 1))
    sub = submit(client, comp, student, batch_size=32, epochs=1)
    first, second = db.scalars(select(Run.id).where(Run.submission_id == sub["id"]).order_by(Run.id)).all()
    with session_scope() as s:  # a worker took the first seed's run 40 s ago; the second still waits
        run_service.claim(s, first, "busy-worker", stale_after=60, max_attempts=3)
        s.execute(update(Run).where(Run.id == first).values(started_at=utcnow() - timedelta(seconds=40)))
    r = client.post(f"/api/submissions/{sub['id']}/cancel", headers=student)
    assert r.status_code == 200, r.text
    detail = _detail(client, sub, student)
    charged = {run["id"]: run["charged_seconds"] for run in detail["runs"]}
    assert charged[first] == pytest.approx(40, abs=5) and charged[second] == 0
    assert detail["charged_seconds"] == pytest.approx(charged[first])
    assert all(run["failure_kind"] is None for run in detail["runs"])


# ---- time limits -----------------------------------------------------------------------------------------


def _unstick_later(fifo, after: float) -> threading.Timer:
    """A safety net: should the limit not work, a writer opens the FIFO after `after` s and closes it, so
    the stuck read ends (the test then fails instead of hanging)."""
    def open_and_close():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is reading: nothing is stuck
            pass
    timer = threading.Timer(after, open_and_close)
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.slow
def test_a_hung_run_ends_as_timeout_and_the_same_process_trains_the_next(client, db, contest, tmp_path,
                                                                        monkeypatch):
    _limits_env(monkeypatch, floor_seconds=2)
    fifo = tmp_path / "stalled-mount.tar.gz"
    os.mkfifo(fifo)
    hung, student = contest(dataset={"name": "cifar10", "path": str(fifo)},
                            budget={"max_epochs": 1, "max_seconds": 1})  # capped at 1 + 0.5 + 2 s
    sub = submit(client, hung, student, batch_size=32)
    handler = signal.getsignal(signal.SIGUSR1)
    net = _unstick_later(fifo, 120)
    t0 = time.perf_counter()
    try:
        assert _wake() == "timeout"
    finally:
        net.cancel()
    assert time.perf_counter() - t0 < 60
    assert signal.getsignal(signal.SIGUSR1) == handler  # the task put this process's handler back
    detail = _detail(client, sub, student)
    run = detail["runs"][0]
    assert (detail["status"], detail["failure_kind"], run["failure_kind"]) == ("failed", "timeout", "timeout")
    assert run["error"].startswith("ran past its time limit of ") and run["attempts"] == 1
    assert 2 <= run["charged_seconds"] < 30 and run["charged_seconds"] == pytest.approx(run["wall_seconds"])

    normal, student = contest()
    nxt = submit(client, normal, student, batch_size=32, epochs=1)
    assert _wake() == "succeeded"
    assert _detail(client, nxt, student)["status"] == "succeeded"


@pytest.mark.slow
def test_a_run_past_its_limit_off_the_main_thread_stops_at_its_next_event(client, db, contest, monkeypatch):
    """No signal handler runs off the main thread: the watchdog's flag stops the run at the engine's next
    event instead."""
    _limits_env(monkeypatch, floor_seconds=1, max_seconds=4)
    comp, student = contest(budget={"max_epochs": 50}, search_space={})
    sub = submit(client, comp, student, batch_size=32, epochs=50)
    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(_wake()))
    worker.start()
    worker.join(120)
    assert out == ["timeout"]
    run = _detail(client, sub, student)["runs"][0]
    assert run["failure_kind"] == "timeout" and "ran past its time limit of 4 s" in run["error"]
    with session_scope() as s:
        assert len(s.scalars(select(EpochMetric.epoch).where(EpochMetric.run_id == run["id"])).all()) < 50


STUCK = """
import signal, sys, threading, time
from app.db import session_scope
from app.submissions import runs
from app.submissions.limits import TimeLimits
from worker.tasks import _Heartbeat

with session_scope() as s:
    claim = runs.claim(s, int(sys.argv[1]), "stuck-worker", stale_after=60, max_attempts=3)
# Native code that never returns to the interpreter: no Python handler runs in this thread.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
hb = _Heartbeat(claim, 0.2, TimeLimits(soft_seconds=1, hard_seconds=3, basis="predicted 0 s × 3"),
                started=time.perf_counter(), hard_kill=True)
hb.interrupt_with(threading.get_ident())
hb.start()
open(sys.argv[2], "rb")  # blocks: nobody writes to the FIFO
print("the read returned")
"""


@pytest.mark.slow
def test_past_the_hard_limit_the_watchdog_writes_the_timeout_and_kills_its_process(client, db, contest,
                                                                                  tmp_path):
    """A hang the soft signal can't break: the process is killed (in a subprocess: it dies for real)."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    comp, student = contest()
    sub = submit(client, comp, student, batch_size=32, epochs=1)
    run_id = db.scalar(select(Run.id).where(Run.submission_id == sub["id"]))
    net = _unstick_later(fifo, 60)
    try:
        proc = subprocess.run([sys.executable, "-c", STUCK, str(run_id), str(fifo)], capture_output=True,
                              text=True, timeout=90)
    finally:
        net.cancel()
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "the read returned" not in proc.stdout
    detail = _detail(client, sub, student)
    run = detail["runs"][0]
    assert (run["status"], run["failure_kind"]) == ("failed", "timeout")
    assert run["error"] == ("ran past its time limit of 1 s (predicted 0 s × 3); it did not stop, so its "
                            "process was killed")
    assert run["charged_seconds"] >= 3
