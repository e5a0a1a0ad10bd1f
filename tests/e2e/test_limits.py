"""Time limits with real worker processes, on both stacks: a run that hangs ends as `timeout`, and the same
worker (the same pool child: the soft limit needs no new process) trains the next run.

The hang is a real one: the competition's dataset path is a FIFO that nobody writes to, so opening it blocks
in the kernel, as a read from a stalled network mount does. The worker runs with a 15 s floor, and the
competition's budget (max_seconds 1) caps the run's limit at 1 + 0.5 + 15 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.services import wait_for
from tests.e2e.test_stack import ADMIN
from worker.processes import spawn, stop

pytestmark = [pytest.mark.slow, pytest.mark.e2e]




def _children(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in out)


def _competition(http: httpx.Client, org: dict, stack: dict, slug: str, path: Path, **budget) -> dict:
    comp = {"slug": slug, "title": slug, "hardware_class": stack["hw"], "seeds": [0],
            "dataset": {"name": "cifar10", "path": str(path)}, "model": {"width": 8},
            "budget": {"max_epochs": 1, **budget}}
    assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
    token = http.post(f"/api/competitions/{slug}/join", json={"name": "s", "team": slug}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


def test_a_hung_run_ends_as_timeout_and_the_worker_trains_the_next(stack, tmp_path):
    default = [p for p in stack["procs"] if "worker.cli" in " ".join(p.args)][0]
    stop(default)
    log = tmp_path / "limited.log"
    worker = spawn([sys.executable, "-m", "worker.cli", "worker", "--hostname", "limited@%h"], log,
                   {**os.environ, "HPARENA_TIME_LIMIT_FLOOR_SECONDS": "15", "HPARENA_TIME_LIMIT_GRACE_SECONDS": "10"})
    stack["procs"].append(worker)
    fifo = tmp_path / "stalled-mount.tar.gz"
    os.mkfifo(fifo)

    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=ADMIN).json()["token"]}
        hung = _competition(http, org, stack, "hang", fifo, max_seconds=1)
        normal = _competition(http, org, stack, "next", stack["tiny"])

        def submit(slug: str, headers: dict) -> int:
            r = http.post(f"/api/competitions/{slug}/submissions", json={"config": {"batch_size": 32}},
                          headers=headers)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def run_of(sid: int, headers: dict) -> dict:
            return http.get(f"/api/submissions/{sid}", headers=headers).json()["runs"][0]

        stuck = submit("hang", hung)
        wait_for(lambda: run_of(stuck, hung)["status"] == "running", 180, "the hung run to start", log)
        child = _children(worker)
        nxt = submit("next", normal)  # waits behind the hung run: the worker trains one run at a time

        run = wait_for(lambda: (r := run_of(stuck, hung))["status"] not in ("queued", "running") and r, 120,
                    "the hung run to time out", log)
        assert (run["status"], run["failure_kind"], run["attempts"]) == ("failed", "timeout", 1), run
        assert run["error"].startswith("ran past its time limit of ") and "process was killed" not in run["error"]
        limit = float(run["error"].split("time limit of ")[1].split(" s")[0])
        assert 15 <= limit <= 17 and limit <= run["charged_seconds"] < limit + 10
        print(f"\nhung run: {run['error']}; charged {run['charged_seconds']:.1f} s")

        done = wait_for(lambda: (r := run_of(nxt, normal))["status"] not in ("queued", "running") and r, 240,
                     "the next run to finish", log)
        assert done["status"] == "succeeded" and done["worker_hostname"].startswith("limited@"), done
        assert _children(worker) == child  # the same pool child: the soft limit left it healthy
        assert "; stopping it" in log.read_text()  # the watchdog said so in the worker log
