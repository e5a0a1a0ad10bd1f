"""Celery task events on Redis (HPARENA_TASK_EVENTS), through real processes: a monitor built as Flower builds
its own (a Celery app that knows only the broker URL, and Celery's event receiver) sees the training token the
API sends, then the worker receive it, start it and finish it with its runtime: what Flower's Tasks tab shows.
Only the Redis stack: the setting is refused on the embedded broker (tests/app/test_task_events.py).
"""

from __future__ import annotations

import time

import httpx
import pytest
from celery import Celery

from app.queue import TRAIN_TASK
from tests.e2e.conftest import REDIS_URL
from tests.e2e.test_drain import Contest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def stack_env() -> dict[str, str]:
    return {"HPARENA_TASK_EVENTS": "true"}


class Monitor:
    """Celery's event receiver on the broker, as Flower runs it: the events in the order they came, read while a
    test waits for one of them."""

    def __init__(self, app: Celery, connection, log):
        self.events: list[dict] = []
        self.log = log
        receiver = app.events.Receiver(connection, handlers={"*": self.events.append})
        # Raises after two minutes without any event; a live worker sends a heartbeat every 2 s.
        self._capture = receiver.itercapture(limit=None, timeout=120, wakeup=True)

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        for _ in self._capture:
            if found := predicate(self.events):
                return found
            if time.monotonic() > deadline:
                break
        seen = [(e["type"], e.get("hostname")) for e in self.events[-30:]]
        raise AssertionError(f"no {what} within {timeout:.0f} s; last events: {seen}; worker log tail:\n"
                             f"{self.log.read_text()[-3000:]}")


def _from_worker(hw: str):
    def find(events: list[dict]):
        return next((e for e in events if e["type"].startswith("worker-") and e["hostname"].startswith(f"{hw}@")),
                    None)
    return find


def _trained(worker: str):
    """A training task `worker` received, started and finished: those three events, by type."""
    def find(events: list[dict]):
        mine = [e for e in events if e.get("hostname") == worker and e["type"].startswith("task-")]
        for received in (e for e in mine if e["type"] == "task-received" and e["name"] == TRAIN_TASK):
            steps = {e["type"]: e for e in mine if e["uuid"] == received["uuid"]}
            if {"task-started", "task-succeeded"} <= steps.keys():
                return steps
        return None
    return find


@pytest.mark.parametrize("stack", ["redis+postgresql"], indirect=True)
def test_a_monitor_on_redis_sees_each_training_task_sent_received_started_and_succeeded(stack):
    hw, log = stack["hw"], stack["logs"] / "worker.log"
    api = stack["procs"][0]  # uvicorn, in one process: the one that sends the submission's token
    flower_like = Celery(broker=REDIS_URL)  # what `celery --broker=redis://... flower` has: the broker URL only
    with flower_like.connection_for_read() as conn, httpx.Client(base_url=stack["url"], timeout=30) as http:
        monitor = Monitor(flower_like, conn, log)
        # Subscribed, and the worker is up: its own events (online, heartbeats) reach the monitor.
        worker = monitor.wait(_from_worker(hw), 180, "event from the worker")["hostname"]
        contest = Contest(http, stack, epochs=1)
        sid = contest.submit()
        steps = monitor.wait(_trained(worker), 300, "training task received, started and succeeded")
        assert contest.wait_over(sid, "the submission to finish", log)["status"] == "succeeded"

    events = monitor.events
    order = [events.index(steps[t]) for t in ("task-received", "task-started", "task-succeeded")]
    assert order == sorted(order), [e["type"] for e in events]
    assert steps["task-succeeded"]["runtime"] > 0  # Flower's Runtime column
    assert steps["task-succeeded"]["result"] == repr("succeeded")  # its Result column: how the run ended
    assert "deployment" in steps["task-received"]["kwargs"]  # the token's only argument, shown as its kwargs
    # Whatever sends a token announces it (task_send_sent_event): the API did for the submission.
    sent = [e for e in events if e["type"] == "task-sent" and e.get("queue") == f"train.{hw}"]
    assert {e["name"] for e in sent} == {TRAIN_TASK}
    assert steps["task-received"]["uuid"] in {e["uuid"] for e in sent}
    assert api.pid in {e["pid"] for e in sent}, [(e["hostname"], e["pid"]) for e in sent]
