"""`hparena submit --watch` follows a real run to its score: the CLI as a subprocess, against uvicorn and a
real Celery worker training on 300 CIFAR-10 images (both stacks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ADMIN = {"Authorization": "Bearer e2e-admin-token"}


def hparena(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_watch_follows_a_real_run_to_its_score(stack, tmp_path):
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=ADMIN).json()["token"]}
        comp = {"slug": "watch", "title": "watch", "hardware_class": stack["hw"], "seeds": [0, 1],
                "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
                "budget": {"max_epochs": 2}, "search_space": {"lr": {"min": 1e-05, "max": 1.0}}}
        assert http.post("/api/competitions", json=comp, headers=org).status_code == 201
        token = http.post("/api/competitions/watch/join", json={"name": "s", "team": "owls"}).json()["token"]
        student = {"Authorization": f"Bearer {token}"}

        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "COLUMNS": "160"}
        login = hparena("login", stack["url"], token, env=env, timeout=60)
        assert login.returncode == 0, login.stdout + login.stderr
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("competition: watch\nconfig:\n  lr: 0.05\n  batch_size: 32\n")

        watched = hparena("submit", str(cfg), "--watch", "--interval", "0.5", env=env, timeout=400)
        out = watched.stdout
        assert watched.returncode == 0, out + watched.stderr
        subs = http.get("/api/submissions", headers=student).json()
        assert len(subs) == 1
        api = http.get(f"/api/submissions/{subs[0]['id']}", headers=student).json()

    assert api["status"] == "succeeded", api
    assert f"submitted #{api['id']} to watch (2 seeds): queue position" in out
    for seed in (0, 1):  # each seed's epochs as they landed, with their public accuracy
        for epoch in (1, 2):
            assert re.search(rf"seed {seed}: epoch {epoch}/2: public accuracy \d\.\d{{4}}", out), out
    final = re.search(r"succeeded: accuracy (\d\.\d{4}) ± (\d\.\d{4}) \(public half, mean of 2 seeds\), "
                      r"(\d+\.\d{4}) CPU-hours", out)
    assert final, out
    assert float(final[1]) == pytest.approx(api["accuracy"], abs=5e-5)
    assert float(final[2]) == pytest.approx(api["accuracy_std"], abs=5e-5)
    assert float(final[3]) == pytest.approx(api["gpu_seconds"] / 3600, abs=5e-5)
    assert "Traceback" not in watched.stderr
    print(out)
