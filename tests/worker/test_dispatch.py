"""Dispatch by the database (app.dispatch): wake-up tokens, the reconciler, the deployment's identity,
and the fair order in which tokens claim runs. Nothing here trains: tokens and claims only."""

from __future__ import annotations

import time
import uuid

import redis
from sqlalchemy import select

from app.db import session_scope
from app.dispatch import reconcile
from app.submissions import runs as run_service
from app.submissions.models import Run
from tests.conftest import reset_caches
from tests.e2e.services import free_port
from tests.factories import cpu_class, join, make_competition, make_organizer

REDIS = "redis://127.0.0.1:6379/15"


def _use_broker(monkeypatch, url: str) -> None:
    monkeypatch.setenv("HPARENA_BROKER_URL", url)
    reset_caches()


def _submit(client, slug, student, **config):
    r = client.post(f"/api/competitions/{slug}/submissions", json={"config": {"batch_size": 32, **config}},
                    headers=student)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_submission_made_while_the_broker_is_down_is_kept_and_dispatched_when_it_returns(
        client, admin_headers, settings_env, monkeypatch):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0, 1])
    student = join(client, comp["slug"])
    _use_broker(monkeypatch, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    t0 = time.perf_counter()
    sid = _submit(client, comp["slug"], student)
    assert time.perf_counter() - t0 < 15
    detail = client.get(f"/api/submissions/{sid}", headers=student).json()
    assert detail["status"] == "queued" and [r["status"] for r in detail["runs"]] == ["queued", "queued"]
    queue = {q["queue"]: q for q in client.get("/api/admin/workers", headers=admin_headers).json()["queues"]}
    q = queue["train.cpu"]
    assert (q["queued_runs"], q["running_runs"], q["broker_messages"]) == (2, 0, None)
    with session_scope() as s:  # a worker's beat while the broker is still down: nothing to do, no error
        assert reconcile(s, "train.cpu", grace_seconds=0) == 0

    _use_broker(monkeypatch, "filesystem://")  # the broker is back (empty)
    with session_scope() as s:
        assert reconcile(s, "train.cpu", grace_seconds=0) == 2
    with session_scope() as s:  # the next beat finds a token for every queued run
        assert reconcile(s, "train.cpu", grace_seconds=0) == 0
    queue = {q["queue"]: q for q in client.get("/api/admin/workers", headers=admin_headers).json()["queues"]}
    assert queue["train.cpu"]["broker_messages"] == 2


def test_the_reconciler_refills_a_redis_that_lost_its_queue(client, admin_headers, settings_env, database_url,
                                                             monkeypatch):
    hw = f"t{uuid.uuid4().hex[:8]}"
    cpu_class(database_url, hw)
    _use_broker(monkeypatch, REDIS)
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0], hardware_class=hw)
    student = join(client, comp["slug"])
    ids = [_submit(client, comp["slug"], student, lr=lr) for lr in (0.1, 0.2, 0.3)]
    queue = f"train.{hw}"
    r = redis.Redis.from_url(REDIS)
    try:
        assert r.llen(queue) == 3
        with session_scope() as s:
            assert reconcile(s, queue, grace_seconds=0) == 0
        r.delete(queue)  # what a restart of a Redis without persistence leaves: no key at all
        with session_scope() as s:
            assert reconcile(s, queue, grace_seconds=0) == 3
        assert r.llen(queue) == 3
        client.post(f"/api/submissions/{ids[0]}/cancel", headers=student)  # fewer queued runs than tokens
        with session_scope() as s:
            assert reconcile(s, queue, grace_seconds=0) == 0
    finally:
        r.delete(queue)


def _runs_of(db, submission_ids):
    return {sid: db.scalars(select(Run.id).where(Run.submission_id == sid)).one() for sid in submission_ids}


def test_tokens_claim_runs_in_fair_order_not_broker_order(client, admin_headers, db):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0])
    a, b = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    a_subs = [_submit(client, comp["slug"], a, lr=lr) for lr in (0.1, 0.2, 0.3)]
    b_sub = _submit(client, comp["slug"], b)
    run_of = _runs_of(db, [*a_subs, b_sub])

    def take(worker):
        with session_scope() as s:
            got = run_service.claim_next(s, "train.cpu", worker, stale_after=60, max_attempts=3)
        return got.run_id if isinstance(got, run_service.Claimed) else str(got)

    # ann's first entry; then bob's, although ann queued two more before it: ann has one running and bob none;
    # then ann's second. Nothing is left for a fourth worker but ann's third.
    assert [take(w) for w in ("w1", "w2", "w3", "w4")] == [run_of[a_subs[0]], run_of[b_sub], run_of[a_subs[1]],
                                                            run_of[a_subs[2]]]
    assert take("w5") == "no queued run on train.cpu"


def test_a_token_of_another_deployment_is_refused_and_left_for_its_owner(client, admin_headers, db, monkeypatch):
    from worker.tasks import train_run

    monkeypatch.setenv("HPARENA_REFUSE_DELAY_SECONDS", "0")
    reset_caches()
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0])
    student = join(client, comp["slug"])
    sid = _submit(client, comp["slug"], student)

    refused = train_run.apply(kwargs={"deployment": "00000000-0000-4000-8000-000000000000"})
    assert refused.state == "REJECTED"  # requeued for the right consumer, not acknowledged and dropped
    assert client.get(f"/api/submissions/{sid}", headers=student).json()["status"] == "queued"
    (worker,) = client.get("/api/admin/workers", headers=admin_headers).json()["workers"]
    assert "refused a message from deployment 00000000-0000-4000-8000-000000000000" in worker["problem"]
    assert "HPARENA_DATABASE_URL" in worker["problem"]
