"""Fair-share dispatch with a real worker, on both stacks (filesystem broker + SQLite, Redis + PostgreSQL):
one team's twenty queued entries do not hold back another team's first. The broker holds the tokens in
submission order (the other team's is the 21st); the database decides which run each token starts."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest

from tests.e2e.test_stack import ADMIN, _wait

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_team_a_queues_twenty_then_team_b_one_and_b_starts_second(stack):
    with httpx.Client(base_url=stack["url"], timeout=30) as http:
        org = {"Authorization": "Bearer " + http.post("/api/admin/users", json={"name": "o", "role": "organizer"},
                                                      headers=ADMIN).json()["token"]}
        comp = {"slug": "fair", "title": "fair", "hardware_class": stack["hw"], "seeds": [0],
                "dataset": {"name": "cifar10", "path": str(stack["tiny"])}, "model": {"width": 8},
                "budget": {"max_epochs": 1}}
        assert http.post("/api/competitions", json=comp, headers=org).status_code == 201

        def member(team: str) -> dict:
            r = http.post("/api/competitions/fair/join", json={"name": team, "team": team})
            assert r.status_code == 201, r.text
            return {"Authorization": f"Bearer {r.json()['token']}"}

        a, b = member("a"), member("b")

        def submit(student: dict, lr: float) -> int:
            # Twenty distinct configs: identical ones would reuse the first one's result once it succeeded.
            r = http.post("/api/competitions/fair/submissions",
                          json={"config": {"batch_size": 32, "epochs": 1, "lr": lr}}, headers=student)
            assert r.status_code == 201, r.text  # 20 from one token: within the 30 per minute it may send
            return r.json()["id"]

        t0 = time.time()
        a_ids = [submit(a, round(0.01 * (i + 1), 2)) for i in range(20)]
        b_id = submit(b, 0.05)
        queued_in = time.time() - t0

        def started(student: dict, sid: int):
            run = http.get(f"/api/submissions/{sid}", headers=student).json()["runs"][0]
            return run if run["started_at"] else None

        _wait(lambda: started(b, b_id), 300, "team b's entry to start", stack["logs"])
        for sid in a_ids:  # a's remaining entries are not needed: cancel them (409 for those already over)
            assert http.post(f"/api/submissions/{sid}/cancel", headers=a).status_code in (200, 409)

        runs = {sid: http.get(f"/api/submissions/{sid}", headers=student).json()["runs"][0]
                for sid, student in [*((sid, a) for sid in a_ids), (b_id, b)]}
        order = sorted((datetime.fromisoformat(r["started_at"]), sid) for sid, r in runs.items() if r["started_at"])
        # The premise: b queued its entry while a's first was still waiting or training (else a's second
        # could rightly have started before b's entry existed).
        a_done, b_queued = runs[a_ids[0]]["finished_at"], datetime.fromisoformat(runs[b_id]["created_at"])
        assert a_done is None or datetime.fromisoformat(a_done) > b_queued, \
            f"a's first entry ended before b queued (queueing took {queued_in:.1f} s)"
        assert [sid for _, sid in order[:2]] == [a_ids[0], b_id], order
        assert runs[b_id]["attempts"] == 1
        print(f"\n21 entries queued in {queued_in:.1f} s; started in order: a#1, b, then "
              f"{len(order) - 2} more of a's before the cancel")
