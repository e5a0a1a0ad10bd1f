"""Fair share with a per-team running cap (competition.max_running_per_team): a team at its cap waits while
other teams' runs go, also when two workers claim for one team at the same moment; when a capped team's run
ends, a token is sent for its next queued run."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from app.db import session_factory, session_scope
from app.queue import queue_depth
from app.submissions import runs as run_service
from app.submissions.models import Run
from tests.factories import join, make_competition, make_organizer

QUEUE = "train.cpu"


def _submit(client, slug, student, lr):
    r = client.post(f"/api/competitions/{slug}/submissions",
                    json={"config": {"batch_size": 32, "epochs": 1, "lr": lr}}, headers=student)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run_of(db, submission_id):
    return db.scalars(select(Run.id).where(Run.submission_id == submission_id)).one()


def _take(session, worker):
    got = run_service.claim_next(session, QUEUE, worker, stale_after=60, max_attempts=3)
    return got.run_id if isinstance(got, run_service.Claimed) else str(got)


def take(worker):
    with session_scope() as s:
        return _take(s, worker)


@pytest.fixture
def capped(client, admin_headers, db):
    """A competition capped at one running run per team; ann queues three entries, then bob one:
    (client, ann's headers, ann's run ids, bob's run id)."""
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0], max_running_per_team=1)
    ann, bob = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    ann_subs = [_submit(client, comp["slug"], ann, lr) for lr in (0.1, 0.2, 0.3)]
    bob_sub = _submit(client, comp["slug"], bob, 0.1)
    return ann, ann_subs, [_run_of(db, s) for s in ann_subs], _run_of(db, bob_sub)


def test_a_team_at_its_running_cap_waits_while_another_teams_run_goes(client, capped):
    ann, ann_subs, ann_runs, bob_run = capped
    assert [take("w1"), take("w2")] == [ann_runs[0], bob_run]
    # ann has one run training, her cap: her two other entries wait although workers are free.
    idle = take("w3")
    assert idle == (f"no queued run on {QUEUE} may start now (2 queued: their teams are at their running cap, "
                    "or other workers are taking them)")
    # Her running entry ends (cancelled here): the slot is free, and her next entry is taken.
    assert client.post(f"/api/submissions/{ann_subs[0]}/cancel", headers=ann).status_code == 200
    assert take("w3") == ann_runs[1]
    assert take("w4").startswith(f"no queued run on {QUEUE} may start now (1 queued")


def test_two_workers_claiming_for_one_capped_team_at_once_start_only_one_of_its_runs(capped):
    """Each worker's pick sees only committed claims: without the count under the team's lock, the second
    worker would start ann's second entry beside her first."""
    _, _, ann_runs, bob_run = capped
    first = session_factory()()
    try:
        assert _take(first, "w1") == ann_runs[0]  # claimed, not committed yet
        second: list = []
        t = threading.Thread(target=lambda: second.append(take("w2")))
        t.start()
        t.join(1.5)
        # It waits for the first claim to commit: on the team's row lock (PostgreSQL), on the database's
        # write lock (SQLite).
        assert t.is_alive() and second == []
        first.commit()
    finally:
        first.close()
    t.join(30)
    assert second == [bob_run]
    assert take("w3").startswith(f"no queued run on {QUEUE} may start now (2 queued")


@pytest.mark.slow
@pytest.mark.parametrize("cap", [1, None])
def test_when_a_capped_teams_run_ends_its_next_queued_run_gets_a_token(client, admin_headers, db, tiny_cifar, cap):
    """Real runs through the eager Celery task: ann's first entry trains, then bob's (his team never
    started one) before ann's second. Each run ann finishes under a cap sends a token for her next queued
    run (the claims that skipped it while she was at her cap may have used its token up); without a cap,
    nothing extra is sent."""
    from worker.tasks import train_run

    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0], max_running_per_team=cap,
                            dataset={"name": "cifar10", "path": str(tiny_cifar)})
    ann, bob = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    ann_runs = [_run_of(db, _submit(client, comp["slug"], ann, lr)) for lr in (0.1, 0.2)]
    bob_run = _run_of(db, _submit(client, comp["slug"], bob, 0.1))
    assert queue_depth(QUEUE) == 3  # one token per submitted run

    trained = []
    for _ in range(3):
        assert train_run.apply().get() == "succeeded"  # eager: takes no message from the broker
        db.expire_all()
        trained.append(db.scalars(select(Run.id).where(Run.status == "succeeded").order_by(Run.finished_at.desc())
                                  ).first())
    assert trained == [ann_runs[0], bob_run, ann_runs[1]]
    # Under the cap: one extra token after ann's first run (her second was queued); none after bob's (no
    # entry of his left) or ann's second (none left either).
    assert queue_depth(QUEUE) == (4 if cap else 3)
