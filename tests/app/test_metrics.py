"""`GET /metrics`: scraped over HTTP and parsed with prometheus-client's own parser."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.admin.models import WorkerNode
from app.admin.service import upsert_node
from app.db import utcnow
from app.submissions.models import Run, RunStatus
from tests.conftest import reset_caches
from tests.e2e.services import free_port
from tests.factories import (
    CompetitionFactory,
    SubmissionFactory,
    bind,
    join,
    make_competition,
    make_organizer,
    submit,
    team_member,
)
from worker.processes import spawn, stop, wait_http


@pytest.fixture
def client(db):
    """A client on an app of its own: the latency histograms are the app's, and these tests count them from
    zero (the shared fixture reuses one app across tests)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as c:
        yield c


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _planted_run(db, comp, team, user, status: str, **columns) -> Run:
    """A submission and its run made by the factory, then given a worker's columns."""
    scores = {"accuracy": 0.5, "gpu_seconds": columns["gpu_seconds"]} if status == RunStatus.succeeded else {}
    sub = SubmissionFactory(competition_id=comp.id, team_id=team.id, user_id=user.id, status=status,
                            config={"lr": 0.01 + next(_lr) / 1000}, **scores)
    run = db.scalars(select(Run).where(Run.submission_id == sub.id)).one()
    for k, v in columns.items():
        setattr(run, k, v)
    db.commit()
    return run


_lr = iter(range(1, 1000))


def test_metrics_report_queues_runs_histograms_heartbeats_and_latency(client, db, admin_headers):
    # Two runs queued over HTTP (a competition with two seeds): two rows queued, two messages in the broker.
    org = make_organizer(client, admin_headers)
    comp_http = make_competition(client, org, seeds=[0, 1])
    student = join(client, comp_http["slug"], name="alice", team="owls")
    sid = submit(client, comp_http, student, lr=0.05, batch_size=32)["id"]
    assert client.get(f"/api/submissions/{sid}", headers=student).status_code == 200

    # Rows as workers leave them, on class cpu, and one queued run on another class.
    bind(db)
    comp = CompetitionFactory()
    team, user = team_member(comp, "ravens")
    now = utcnow()
    running = _planted_run(db, comp, team, user, RunStatus.running, started_at=now - timedelta(minutes=5),
                           heartbeat_at=now - timedelta(seconds=30))
    fast = _planted_run(db, comp, team, user, RunStatus.succeeded, wall_seconds=12.5, gpu_seconds=10.0,
                        result={"images_per_sec": 250.0})
    _planted_run(db, comp, team, user, RunStatus.succeeded, wall_seconds=700.0, gpu_seconds=650.0,
                 result={"images_per_sec": 5000.0})
    _planted_run(db, comp, team, user, RunStatus.failed, wall_seconds=3.0, gpu_seconds=2.0)
    # A result reused from an identical earlier run trained nothing: a succeeded run, in no histogram.
    _planted_run(db, comp, team, user, RunStatus.succeeded, wall_seconds=700.0, gpu_seconds=650.0,
                 result={"images_per_sec": 5000.0}, reused_from_run_id=fast.id)
    _planted_run(db, comp, team, user, RunStatus.queued, queue="train.h100")

    upsert_node(db, "gpu-node-1", "train.cpu", hardware_class="cpu", current_run_id=running.id)
    upsert_node(db, "gpu-node-2", "train.h100", hardware_class="h100")
    for hostname, age in (("gpu-node-1", 42), ("gpu-node-2", 5)):
        db.get(WorkerNode, hostname).last_seen = utcnow() - timedelta(seconds=age)
    db.commit()

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = scrape(r.text)

    assert value(m, "hparena_database_up") == 1
    assert value(m, "hparena_queue_depth", queue="train.cpu", hardware_class="cpu") == 2
    assert value(m, "hparena_queue_depth", queue="train.h100", hardware_class="h100") == 1
    assert value(m, "hparena_queue_broker_messages", queue="train.cpu", hardware_class="cpu") == 2
    assert value(m, "hparena_queue_broker_messages", queue="train.h100", hardware_class="h100") == 0

    by_state = {s.value: value(m, "hparena_runs", state=s.value, hardware_class="cpu") for s in RunStatus}
    assert by_state == {"queued": 2, "running": 1, "succeeded": 3, "failed": 1, "diverged": 0, "cancelled": 0}
    assert value(m, "hparena_runs", state="queued", hardware_class="h100") == 1
    assert value(m, "hparena_runs", state="succeeded", hardware_class="h100") == 0

    ok = {"hardware_class": "cpu", "state": "succeeded"}
    for name, total in (("hparena_run_duration_seconds", 712.5), ("hparena_run_device_seconds", 660.0)):
        assert value(m, f"{name}_count", **ok) == 2
        assert value(m, f"{name}_sum", **ok) == pytest.approx(total)
        assert [value(m, f"{name}_bucket", **ok, le=le) for le in ("5.0", "15.0", "600.0", "1200.0", "+Inf")] \
            == [0, 1, 1, 2, 2]
    failed = {"hardware_class": "cpu", "state": "failed"}
    assert value(m, "hparena_run_duration_seconds_count", **failed) == 1
    assert value(m, "hparena_run_duration_seconds_bucket", **failed, le="1.0") == 0
    assert value(m, "hparena_run_duration_seconds_bucket", **failed, le="5.0") == 1
    assert value(m, "hparena_run_images_per_second_count", hardware_class="cpu") == 2
    assert value(m, "hparena_run_images_per_second_sum", hardware_class="cpu") == pytest.approx(5250.0)
    assert [value(m, "hparena_run_images_per_second_bucket", hardware_class="cpu", le=le)
            for le in ("100.0", "300.0", "3000.0", "10000.0", "+Inf")] == [0, 1, 1, 2, 2]
    # Queued runs (no result yet) are in no histogram.
    assert value(m, "hparena_run_duration_seconds_count", hardware_class="h100", state="queued") is None

    assert 30 <= value(m, "hparena_run_heartbeat_age_max_seconds", hardware_class="cpu") < 90
    node1 = {"hostname": "gpu-node-1", "hardware_class": "cpu"}
    node2 = {"hostname": "gpu-node-2", "hardware_class": "h100"}
    assert 42 <= value(m, "hparena_worker_heartbeat_age_seconds", **node1) < 102
    assert 5 <= value(m, "hparena_worker_heartbeat_age_seconds", **node2) < 65
    assert value(m, "hparena_worker_busy", **node1) == 1 and value(m, "hparena_worker_busy", **node2) == 0

    # Requests made before the scrape, by route template (never the raw path, bounded label values).
    posted = {"method": "POST", "route": "/api/competitions/{slug}/submissions", "status": "201"}
    assert value(m, "hparena_http_request_duration_seconds_count", **posted) == 1
    assert value(m, "hparena_http_request_duration_seconds_sum", **posted) > 0
    got = {"method": "GET", "route": "/api/submissions/{submission_id}", "status": "200"}
    assert value(m, "hparena_http_request_duration_seconds_count", **got) == 1
    assert not any(f"/api/submissions/{sid}" in dict(labels).get("route", "") for _, labels in m)

    # No team, user or competition name, and no score, in what anyone inside the cluster may read.
    for secret in ("owls", "ravens", "alice", comp_http["slug"], comp.slug, "accuracy"):
        assert secret not in r.text


def test_a_broker_that_is_down_leaves_out_only_its_own_figures(client, db, monkeypatch):
    bind(db)
    comp = CompetitionFactory()
    team, user = team_member(comp)
    _planted_run(db, comp, team, user, RunStatus.queued)
    monkeypatch.setenv("HPARENA_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    reset_caches()

    started = time.monotonic()
    m = scrape(client.get("/metrics").text)
    assert time.monotonic() - started < 10  # one quick try, not a hang
    assert value(m, "hparena_queue_depth", queue="train.cpu", hardware_class="cpu") == 1
    assert not [k for k in m if k[0] == "hparena_queue_broker_messages"]
    assert value(m, "hparena_database_up") == 1


def test_latency_labels_unrouted_and_refused_requests_without_raw_paths(client):
    client.get("/no/such/path/12345")
    client.delete("/api/submissions/12345")  # a route, not this method: 405 under its template
    r = client.post("/api/competitions", content=b"x" * (70 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413  # refused by the body limit, before any route saw it

    m = scrape(client.get("/metrics").text)
    name = "hparena_http_request_duration_seconds_count"
    assert value(m, name, method="GET", route="<unrouted>", status="404") == 1
    assert value(m, name, method="DELETE", route="/api/submissions/{submission_id}", status="405") == 1
    assert value(m, name, method="POST", route="<unrouted>", status="413") == 1
    assert not any("12345" in dict(labels).get("route", "") for _, labels in m)


def test_metrics_stay_out_of_the_openapi_document(client):
    assert "/metrics" not in client.app.openapi()["paths"]
    assert client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) \
        .headers["content-type"].startswith("application/openmetrics-text")


@pytest.mark.slow
def test_several_api_processes_report_their_latency_together(tmp_path):
    """`hparena api --workers 2` with PROMETHEUS_MULTIPROC_DIR: whichever process answers the scrape counts
    the requests both served."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc), "HPARENA_VAR_DIR": str(tmp_path / "var"),
           "HPARENA_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}", "HPARENA_BROKER_URL": "filesystem://"}
    proc = spawn([sys.executable, "-m", "worker.cli", "api", "--port", str(port), "--workers", "2"],
                 tmp_path / "api.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/health")  # counted too
        sent = 1
        # A new connection per request, until both processes have served some (each writes its own file).
        while len(list(multiproc.glob("histogram_*.db"))) < 2 and sent < 400:
            assert httpx.get(f"{url}/api/health", headers={"Connection": "close"}).status_code == 200
            sent += 1
        assert len(list(multiproc.glob("histogram_*.db"))) == 2, (tmp_path / "api.log").read_text()
        for _ in range(4):  # any process may answer; each reports the sum
            m = scrape(httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text)
            assert value(m, "hparena_http_request_duration_seconds_count", method="GET", route="/api/health",
                         status="200") == sent
            assert value(m, "hparena_database_up") == 1
    finally:
        stop(proc)
