"""Draining a worker: SIGTERM to the worker's main process (what `docker stop`, Kubernetes scale-in and the
image's preStop hook send to PID 1) is Celery's warm shutdown. The worker stops taking new work, lets the run
it is training finish and report, then exits. Only the embedded stack: the signal path is the worker's own,
the same on either broker, and each stack costs minutes of CPU.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.e2e.services import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ADMIN = {"Authorization": "Bearer e2e-admin-token"}


EPOCHS = 8


class Contest:
    """One competition on the stack's class and one student: submit and read submissions over HTTP. Each
    submission trains `epochs` epochs (tests/e2e/test_task_events.py uses one)."""

    def __init__(self, http: httpx.Client, stack: dict, epochs: int = EPOCHS):
        self.http, self.epochs = http, epochs
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=ADMIN).json()["token"]}
        comp = {"slug": "drain", "title": "drain", "hardware_class": stack["hw"], "seeds": [0],
                "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
                "budget": {"max_epochs": epochs}}
        assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
        self.student = {"Authorization": "Bearer " + http.post("/api/competitions/drain/join",
                                                               json={"name": "s", "team": "t"}).json()["token"]}

    def submit(self) -> int:
        r = self.http.post("/api/competitions/drain/submissions", headers=self.student,
                           json={"config": {"batch_size": 32, "epochs": self.epochs}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def detail(self, sid: int) -> dict:
        return self.http.get(f"/api/submissions/{sid}", headers=self.student).json()

    def cancel(self, sid: int) -> None:
        assert self.http.post(f"/api/submissions/{sid}/cancel", headers=self.student).status_code == 200

    def wait_over(self, sid: int, what: str, log) -> dict:
        return wait_for(lambda: (d := self.detail(sid))["status"] not in ("queued", "running") and d, 600, what, log)


def _worker(stack: dict):
    return [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]


def _gone(http: httpx.Client, stack: dict) -> bool:
    workers = http.get("/api/admin/workers", headers=ADMIN).json()["workers"]
    return not [w for w in workers if w["hostname"].startswith(f"{stack['hw']}@")]


@pytest.mark.parametrize("stack", ["filesystem+sqlite"], indirect=True)
def test_sigterm_lets_the_running_run_finish_takes_nothing_new_and_exits(stack):
    worker, log = _worker(stack), stack["logs"] / "worker.log"
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        contest = Contest(http, stack)
        first = contest.submit()
        wait_for(lambda: contest.detail(first)["runs"][0]["epochs"], 300, "the first epoch", log)
        second = contest.submit()  # waits behind the first: one worker, concurrency 1
        os.kill(worker.pid, signal.SIGTERM)  # the main process only, as a container runtime signals PID 1

        done = contest.wait_over(first, "the running submission to finish after SIGTERM", log)
        run = done["runs"][0]
        assert done["status"] == "succeeded", done
        assert run["attempts"] == 1  # not retried: it trained through the shutdown in one go
        assert [e["epoch"] for e in run["epochs"]] == list(range(1, EPOCHS + 1))

        assert worker.wait(timeout=60) == 0  # then it exits, cleanly
        assert contest.detail(second)["status"] == "queued"  # and it took nothing new on the way out
        assert _gone(http, stack)  # it deregistered


@pytest.mark.parametrize("stack", ["filesystem+sqlite"], indirect=True)
def test_a_slot_freed_during_the_shutdown_starts_nothing_and_the_next_worker_gets_the_token(stack):
    """The race behind the drain: Celery's consumer sees the shutdown flag only at the next turn of its
    loop (seconds later on the embedded broker, whose poll lasts 2 s). A run that ends inside that window
    frees the prefetch slot, and the queued run's token is delivered. The worker puts it back instead of
    training it. The first run is cancelled just after the signal, so that it ends inside the window."""
    worker, log = _worker(stack), stack["logs"] / "worker.log"
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        contest = Contest(http, stack)
        first = contest.submit()
        wait_for(lambda: contest.detail(first)["runs"][0]["epochs"], 300, "the first epoch", log)
        second = contest.submit()
        os.kill(worker.pid, signal.SIGTERM)
        contest.cancel(first)  # its heartbeat (1 s) sees it, and the run stops at its next step

        assert worker.wait(timeout=60) == 0
        assert contest.detail(first)["status"] == "cancelled"
        assert contest.detail(second)["status"] == "queued"
        # When the run ended inside the window (the usual case: the test is built for it), the queued run's
        # token was delivered, and it went back; on a slow machine the run may end after the window, and no
        # second token is delivered at all.
        text = log.read_text()
        if text.count("] received") > 1:
            assert "back to the queue" in text

        # Nothing was lost: the token is in the broker, and the next worker on the class trains the run.
        stack["start_worker"](f"{stack['hw']}-next")
        assert contest.wait_over(second, "the next worker to train the queued submission", log)["status"] == \
            "succeeded"
