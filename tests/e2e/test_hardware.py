"""A worker started for the wrong hardware class, with real processes on both stacks: it stays up, consumes
nothing (its class's queued run stays queued), and says why in its log and on the admin fleet view."""

from __future__ import annotations

import os
import sys
import time

import httpx
import pytest

from tests.e2e.test_stack import ADMIN, _wait
from worker.processes import spawn

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _queued_run(http: httpx.Client, stack: dict, cls: str) -> tuple[dict, int]:
    """A competition on class `cls` and one submission to it: (student headers, submission id)."""
    org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": f"o-{cls}", "role": "organizer"},
                                                  headers=ADMIN).json()["token"]}
    comp = {"slug": cls, "title": cls, "hardware_class": cls, "seeds": [0], "model": {"width": 8},
            "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "budget": {"max_epochs": 1}}
    r = http.post("/api/competitions", json=comp, headers=org)
    assert r.status_code == 201, r.text
    token = http.post(f"/api/competitions/{cls}/join", json={"name": "s", "team": "t"}).json()["token"]
    student = {"Authorization": f"Bearer {token}"}
    r = http.post(f"/api/competitions/{cls}/submissions", json={"config": {"batch_size": 32}}, headers=student)
    assert r.status_code == 201, r.text
    return student, r.json()["id"]


def _refusing_worker(http: httpx.Client, stack: dict, cls: str) -> dict:
    """Start a worker serving `cls` on this CPU machine and wait for its entry on the fleet view."""
    name = f"w-{cls}"
    log = stack["logs"] / f"{name}.log"
    proc = spawn([sys.executable, "-m", "worker.cli", "worker", "--hostname", f"{name}@%h"], log,
                 {**os.environ, "HPARENA_HARDWARE_CLASS": cls})
    stack["procs"].append(proc)

    def announced():
        fleet = http.get("/api/admin/workers", headers=ADMIN).json()["workers"]
        return next((w for w in fleet if w["hostname"].startswith(f"{name}@") and w["problem"]), None)

    node = _wait(announced, 120, f"worker {name} to report its hardware check", stack["logs"])
    assert "ERROR" in log.read_text() and f"not consuming train.{cls}: " in log.read_text()
    return {"proc": proc, "node": node, "name": name}


def test_a_worker_on_the_wrong_hardware_stays_up_and_consumes_nothing(stack):
    h100, amx = f"{stack['hw']}-h100", f"{stack['hw']}-amx"
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        # h100-80gb's definition under a name of this test's own (its queue shared with no other test), and a
        # CPU class that needs ATen's AMX kernels (no such capability: torch's best on x86 is AVX512).
        spec = next(c for c in http.get("/api/admin/hardware-classes", headers=ADMIN).json()
                    if c["name"] == "h100-80gb")
        body = {k: v for k, v in spec.items() if k not in ("name", "updated_at")}
        assert http.put(f"/api/admin/hardware-classes/{h100}", json=body, headers=ADMIN).status_code == 201
        assert http.put(f"/api/admin/hardware-classes/{amx}", headers=ADMIN, json={
            "device_type": "cpu", "cpu_capability": "AMX", "train_images_per_sec": 40,
            "eval_images_per_sec": 160}).status_code == 201
        queued = {cls: _queued_run(http, stack, cls) for cls in (h100, amx)}

        gpu = _refusing_worker(http, stack, h100)
        assert gpu["node"]["problem"].startswith("CPU: ")
        assert gpu["node"]["problem"].endswith(f"is not hardware class {h100!r}: it is a cpu device, not cuda")
        cpu = _refusing_worker(http, stack, amx)
        assert f"is not hardware class {amx!r}: it runs ATen's " in cpu["node"]["problem"]
        assert cpu["node"]["problem"].endswith(" CPU kernels, not AMX")
        for w, cls in ((gpu, h100), (cpu, amx)):
            assert w["node"]["hardware_class"] == cls and w["node"]["queues"] == [] and w["node"]["threads"] >= 1

        time.sleep(6)  # several seconds, many beats: they stay up, take nothing, and keep saying why
        fleet = http.get("/api/admin/workers", headers=ADMIN).json()
        nodes = {w["hostname"].split("@")[0]: w for w in fleet["workers"]}
        depth = {q["queue"]: q for q in fleet["queues"]}
        for w, cls in ((gpu, h100), (cpu, amx)):
            assert w["proc"].poll() is None, f"{w['name']} exited"
            node = nodes[w["name"]]
            assert node["state"] == "idle" and node["current_run_id"] is None and node["problem"]
            student, sid = queued[cls]
            detail = http.get(f"/api/submissions/{sid}", headers=student).json()
            assert detail["status"] == "queued" and detail["runs"][0]["attempts"] == 0
            assert depth[f"train.{cls}"]["queued_runs"] == 1
            assert depth[f"train.{cls}"]["broker_messages"] in (1, None)  # its token waits in the broker
            assert "hparena.train_run" not in (stack["logs"] / f"{w['name']}.log").read_text().split("ready.")[-1]
