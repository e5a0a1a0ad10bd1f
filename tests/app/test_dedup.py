"""Dedup: an entry whose resolved spec equals an earlier succeeded run's in the same competition reuses its
result instead of training: succeeded at once, linked to the original, charged nothing, counted in the quota.

The originals train for real, through the Celery task applied in this process (as a worker's child runs it),
on 300 real CIFAR-10 images.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.queue import queue_depth
from app.submissions.models import Run, RunLogits
from tests.factories import join, make_competition, make_organizer

pytestmark = pytest.mark.slow

CFG = {"batch_size": 32, "epochs": 1, "lr": 0.05}
IDLE = "skipped: no queued run on train.cpu"


def _wake() -> str:
    """Deliver one wake-up token to this process, as a worker's child would take it."""
    from worker.tasks import train_run

    return train_run.apply().get()


@pytest.fixture
def contest(client, admin_headers, tiny_cifar):
    def make(**kw):
        kw.setdefault("dataset", {"name": "cifar10", "path": str(tiny_cifar)})
        kw.setdefault("seeds", [0])
        return make_competition(client, make_organizer(client, admin_headers), **kw)
    return make


def _post(client, comp, student, config=CFG, **headers):
    return client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": config},
                       headers={**student, **headers})


def _submit(client, comp, student, config=CFG) -> dict:
    r = _post(client, comp, student, config)
    assert r.status_code == 201, r.text
    return r.json()


def _detail(client, student, sid) -> dict:
    return client.get(f"/api/submissions/{sid}", headers=student).json()


def _queued(db) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(Run).where(Run.status == "queued"))


def test_an_identical_entry_reuses_the_result_trains_nothing_and_still_counts(client, db, contest):
    comp = contest(submission_quota=2)
    ann, bob = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    first = _submit(client, comp, ann)
    assert _wake() == "succeeded"
    original = _detail(client, ann, first["id"])["runs"][0]
    assert original["reused_from_run_id"] is None and original["attempts"] == 1

    tokens = queue_depth("train.cpu")
    r = _post(client, comp, bob)
    assert r.status_code == 201, r.text
    copy = r.json()
    assert copy["status"] == "succeeded" and copy["accuracy"] == original["accuracy"]
    assert copy["charged_seconds"] == 0 and copy["gpu_seconds"] == original["gpu_seconds"]
    assert copy["eta_seconds"] is None and copy["prediction_error"] is None
    # Nothing to train: no run queued, no token sent, and a token now finds nothing.
    assert _queued(db) == 0 and queue_depth("train.cpu") == tokens
    assert _wake() == IDLE

    (run,) = _detail(client, bob, copy["id"])["runs"]
    assert run["reused_from_run_id"] == original["id"] and run["id"] != original["id"]
    assert (run["status"], run["attempts"], run["progress"], run["charged_seconds"]) == ("succeeded", 0, 1.0, 0)
    assert run["worker_hostname"] is None and run["wall_seconds"] is None and run["predicted_seconds"] == 0
    assert run["started_at"] and run["finished_at"] and run["error"] is None and run["failure_kind"] is None
    for field in ("accuracy", "gpu_seconds", "stop_reason", "device_name", "result", "epochs"):
        assert run[field] == original[field], field
    assert [e["epoch"] for e in run["epochs"]] == [1]
    logits = db.get(RunLogits, run["id"])  # a later ensemble scores each run's logits
    assert logits is not None and logits.data == db.get(RunLogits, original["id"]).data
    db.expire_all()
    assert db.get(Run, run["id"]).private_accuracy == db.get(Run, original["id"]).private_accuracy

    # On the board: bob's entry ties ann's (the same per-image outcomes: one band); the earlier one is first.
    board = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()["entries"]
    assert [(e["team"], e["submission_id"], e["rank"], e["tie"], e["position"]) for e in board] == [
        ("team-ann", first["id"], 1, True, 1), ("team-bob", copy["id"], 1, True, 2)]
    assert board[1]["accuracy"] == board[0]["accuracy"] and board[1]["gpu_hours"] == board[0]["gpu_hours"]

    # Again: linked to the run that trained, not to bob's copy. It is bob's second entry of his quota of two.
    again = _submit(client, comp, bob)
    assert _detail(client, bob, again["id"])["runs"][0]["reused_from_run_id"] == original["id"]
    refused = _post(client, comp, bob)
    assert refused.status_code == 429 and "quota of 2" in refused.json()["detail"]
    assert _queued(db) == 0


def test_another_config_seed_or_competition_trains_anew(client, db, contest):
    comp = contest()
    ann = join(client, comp["slug"], "ann")
    first = _submit(client, comp, ann)
    assert _wake() == "succeeded"
    original = db.get(Run, _detail(client, ann, first["id"])["runs"][0]["id"])

    other_config = _submit(client, comp, ann, {**CFG, "lr": 0.06})
    # A twin competition (same data, model, budget and seed): the same spec, but dedup stays within one.
    twin = contest(seeds=[0])
    twin_entry = _submit(client, twin, join(client, twin["slug"], "ann"))
    other_seed = contest(seeds=[1])
    seed_entry = _submit(client, other_seed, join(client, other_seed["slug"], "ann"))
    for sub in (other_config, twin_entry, seed_entry):
        assert sub["status"] == "queued" and sub["charged_seconds"] is None
    twin_run = db.scalars(select(Run).where(Run.submission_id == twin_entry["id"])).one()
    assert twin_run.spec_hash == original.spec_hash and twin_run.reused_from_run_id is None
    assert _queued(db) == 3
    assert [_wake(), _wake(), _wake(), _wake()] == ["succeeded", "succeeded", "succeeded", IDLE]


def test_a_submission_partly_reused_trains_only_its_other_seeds(client, db, contest):
    comp = contest(seeds=[0, 1])
    ann = join(client, comp["slug"], "ann")
    first = _submit(client, comp, ann)
    assert _wake() == "succeeded"  # seed 0; then the entry is cancelled before seed 1 trains
    assert client.post(f"/api/submissions/{first['id']}/cancel", headers=ann).json()["status"] == "cancelled"
    seed0, seed1 = _detail(client, ann, first["id"])["runs"]
    assert (seed0["status"], seed1["status"]) == ("succeeded", "cancelled")

    tokens = queue_depth("train.cpu")
    second = _submit(client, comp, ann)
    assert second["status"] == "running"  # one seed done, one to go
    reused, queued = _detail(client, ann, second["id"])["runs"]
    assert (reused["seed"], reused["status"], reused["reused_from_run_id"]) == (0, "succeeded", seed0["id"])
    assert (queued["seed"], queued["status"], queued["reused_from_run_id"]) == (1, "queued", None)
    assert queue_depth("train.cpu") == tokens + 1  # a token for seed 1 only

    assert [_wake(), _wake()] == ["succeeded", IDLE]
    done = _detail(client, ann, second["id"])
    assert done["status"] == "succeeded"
    assert done["runs"][1]["attempts"] == 1 and done["runs"][1]["reused_from_run_id"] is None
    assert done["accuracy"] == pytest.approx((done["runs"][0]["accuracy"] + done["runs"][1]["accuracy"]) / 2)
    assert done["charged_seconds"] == done["runs"][1]["charged_seconds"] > 0


def test_an_idempotent_replay_of_a_reused_entry_returns_it_and_charges_nothing_more(client, db, contest):
    comp = contest(submission_quota=2)
    ann, bob = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    _submit(client, comp, ann)
    assert _wake() == "succeeded"
    first = _post(client, comp, bob, **{"Idempotency-Key": "k-1"})
    again = _post(client, comp, bob, **{"Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "succeeded"
    assert len(client.get("/api/submissions", headers=bob).json()) == 1
    board = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()["entries"]
    assert {e["team"]: e["submissions"] for e in board} == {"team-ann": 1, "team-bob": 1}
    assert db.scalar(select(func.count()).select_from(Run)) == 2
    # The replay used no slot: bob has one left.
    assert _post(client, comp, bob, **{"Idempotency-Key": "k-2"}).status_code == 201
    assert _post(client, comp, bob, **{"Idempotency-Key": "k-3"}).status_code == 429
