"""The admin page: admins only; the fleet by hardware class, queue depth with the oldest waiting run, and runs
whose heartbeat went stale, on the page and in the live.json it polls."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select, update

from app.admin.service import upsert_node
from app.db import session_scope, utcnow
from app.submissions import runs as run_service
from app.submissions.models import Run
from tests.factories import join, make_competition, make_organizer, submit


def _get(client, path: str, token: str | None = None, **kw):
    """GET as a browser: signed in by the cookie (or signed out)."""
    client.cookies.clear()
    if token is not None:
        client.cookies.set("hparena_token", token)
    return client.get(path, headers={"Accept": "text/html"}, **kw)


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _row(html: str, attr: str, value: str) -> str:
    """The markup of the <tr> whose `attr` is `value`."""
    m = re.search(rf'<tr [^>]*{attr}="{re.escape(value)}"[^>]*>(.*?)</tr>', html, re.S)
    assert m, f"no row {attr}={value!r} in:\n{html}"
    return m.group(0)


def _table(html: str, table_id: str) -> str:
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
    assert m, html
    return m.group(1)


def test_only_admins_see_the_admin_page(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    student = join(client, comp["slug"])

    r = _get(client, "/admin", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fadmin"
    assert _get(client, "/admin/live.json").status_code == 401
    for who in (org, student):
        r = _get(client, "/admin", _token(who))
        assert r.status_code == 403 and 'data-page="error"' in r.text and 'id="workers"' not in r.text
        assert _get(client, "/admin/live.json", _token(who)).status_code == 403
    r = _get(client, "/admin", "test-admin-token")
    assert r.status_code == 200 and 'data-page="admin"' in r.text
    assert 'id="workers"' in r.text and 'id="queues"' in r.text and 'id="stale-runs"' in r.text


def test_the_admin_sees_workers_queues_and_stale_runs(client, admin_headers, db):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0, 1, 2])
    student = join(client, comp["slug"])
    first = submit(client, comp, student, lr=0.05, batch_size=32)
    submit(client, comp, student, lr=0.06, batch_size=32)
    with session_scope() as s:
        runs = list(s.scalars(select(Run.id).where(Run.submission_id == first["id"]).order_by(Run.seed)))
        oldest_waiting = s.scalar(select(Run.id).where(Run.submission_id == first["id"], Run.seed == 2))
    # Two of the first submission's runs are taken: one by a live worker, one by a worker gone quiet 10 min ago.
    for run_id, host in zip(runs[:2], ("gpu-node-1", "gpu-node-2"), strict=True):
        with session_scope() as s:
            run_service.claim(s, run_id, host, stale_after=60, max_attempts=3)
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == runs[1]).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    upsert_node(db, "gpu-node-1", "train.cpu", device_name="NVIDIA H200", hardware_class="cpu",
                current_run_id=runs[0])
    upsert_node(db, "idle-node", "train.cpu", device_name="CPU: test", hardware_class="cpu")
    db.commit()

    r = _get(client, "/admin", "test-admin-token")
    assert r.status_code == 200, r.text
    for html in (r.text, client.get("/admin/live.json").json()["html"]):
        busy = _row(_table(html, "workers"), "data-hostname", "gpu-node-1")
        assert 'data-state="busy"' in busy and "NVIDIA H200" in busy
        assert f'<a href="/submissions/{first["id"]}">run {runs[0]}</a>' in busy
        assert re.search(r'data-age-seconds="\d+">\d+ s ago', busy)
        assert 'data-state="idle"' in _row(_table(html, "workers"), "data-hostname", "idle-node")

        # 1 of the first submission's runs and the second's 3 wait; 2 run.
        queue = _row(_table(html, "queues"), "data-queue", "train.cpu")
        assert 'data-queued="4"' in queue
        assert re.search(r'class="num running">2<', queue)
        assert f'data-run-id="{oldest_waiting}"' in queue and f"run {oldest_waiting}, waiting" in queue

        stale = _table(html, "stale-runs")
        row = _row(stale, "data-run-id", str(runs[1]))
        assert f'href="/submissions/{first["id"]}"' in row and "gpu-node-2" in row
        assert re.search(r'data-age-seconds="(\d+)"', row).group(1) in {str(n) for n in range(599, 611)}
        assert f'data-run-id="{runs[0]}"' not in stale  # its heartbeat is fresh

    # live.json carries the fleet as GET /api/admin/workers reports it.
    live = client.get("/admin/live.json").json()["fleet"]
    api = client.get("/api/admin/workers", headers=admin_headers).json()
    assert [w["hostname"] for w in live["workers"]] == [w["hostname"] for w in api["workers"]]
    assert [s["run_id"] for s in api["stale_runs"]] == [runs[1]]
    q = {x["queue"]: x for x in api["queues"]}["train.cpu"]
    assert (q["queued_runs"], q["running_runs"], q["oldest_queued_run_id"]) == (4, 2, oldest_waiting)
    assert q["oldest_queued_age_seconds"] >= 0
    busy = {w["hostname"]: w for w in api["workers"]}["gpu-node-1"]
    assert (busy["current_run_id"], busy["current_submission_id"]) == (runs[0], first["id"])
