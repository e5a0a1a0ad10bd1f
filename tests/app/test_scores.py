"""A submission's scores over its seeds (submissions.service.refresh_submission): the mean, the sample std and
the mean ECE over its k runs, each run's own figures beside them, and the private half's kept off every
participant-facing field. Runs are claimed and finished the way a worker does it (app.submissions.runs), with
planted figures: nothing trains here."""

from __future__ import annotations

import itertools
import statistics

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.submissions import runs as run_service
from app.submissions.models import Run, RunStatus, Submission
from tests.factories import join, make_competition, make_organizer, submit

_n = itertools.count(1)


@pytest.fixture
def contest(client, admin_headers):
    """(competition, a team member's headers) for a competition of the given seeds."""
    def make(seeds):
        n = next(_n)
        comp = make_competition(client, make_organizer(client, admin_headers, f"prof-{n}"), seeds=seeds)
        return comp, join(client, comp["slug"], f"ann-{n}")
    return make


def _runs(submission_id: int) -> list[int]:
    with session_scope() as s:
        return list(s.scalars(select(Run.id).where(Run.submission_id == submission_id).order_by(Run.seed)))


def _finish(run_id: int, status=RunStatus.succeeded, **fields) -> None:
    with session_scope() as s:
        c = run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3)
        assert isinstance(c, run_service.Claimed), c
    with session_scope() as s:
        assert run_service.finish(s, c, status, **fields) is None


def _get(client, sub_id, headers) -> dict:
    r = client.get(f"/api/submissions/{sub_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _private_keys(value, path="") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in
                ([f"{path}.{k}"] if "private" in k else []) + _private_keys(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _private_keys(v, f"{path}[{i}]")]
    return []


def test_three_seeds_give_the_mean_the_sample_std_and_each_seeds_score(client, db, contest):
    comp, ann = contest([0, 1, 2])
    sub = submit(client, comp, ann, lr=0.1, batch_size=32)["id"]
    public, private = [0.80, 0.82, 0.87], [0.70, 0.74, 0.75]
    eces, private_eces = [0.05, 0.06, 0.10], [0.07, 0.08, 0.09]
    for run_id, acc, priv, ece, pece, secs in zip(_runs(sub), public, private, eces, private_eces, (10, 20, 30),
                                                  strict=True):
        _finish(run_id, accuracy=acc, private_accuracy=priv, ece=ece, private_ece=pece, gpu_seconds=secs)

    got = _get(client, sub, ann)
    assert got["status"] == "succeeded" and got["round"] == 0
    assert got["accuracy"] == pytest.approx(statistics.fmean(public))
    assert got["accuracy_std"] == pytest.approx(statistics.stdev(public))  # ddof 1: 0.0361
    assert got["accuracy_std"] == pytest.approx(0.036055, abs=1e-6)
    assert got["ece"] == pytest.approx(0.07)
    assert got["gpu_seconds"] == pytest.approx(60) and got["charged_seconds"] == pytest.approx(60)
    assert [(r["seed"], r["accuracy"], r["ece"], r["round"]) for r in got["runs"]] == [
        (0, 0.80, 0.05, 0), (1, 0.82, 0.06, 0), (2, 0.87, 0.10, 0)]
    # The private half is derived the same way, and kept off everything the participant reads.
    assert _private_keys(got) == []
    listed = client.get("/api/submissions", headers=ann).json()
    assert listed[0]["accuracy_std"] == got["accuracy_std"] and _private_keys(listed) == []
    db.expire_all()
    row = db.get(Submission, sub)
    assert row.private_accuracy == pytest.approx(statistics.fmean(private))
    assert row.private_accuracy_std == pytest.approx(statistics.stdev(private))
    assert row.private_ece == pytest.approx(0.08)


def test_no_score_until_every_seed_is_in_and_none_when_one_fails(client, contest):
    comp, ann = contest([0, 1, 2])
    sub = submit(client, comp, ann, lr=0.1, batch_size=32)["id"]
    first, second, third = _runs(sub)
    _finish(first, accuracy=0.8, gpu_seconds=10)
    _finish(second, accuracy=0.9, gpu_seconds=10)
    got = _get(client, sub, ann)
    assert (got["status"], got["accuracy"], got["accuracy_std"], got["ece"]) == ("running", None, None, None)
    assert [r["accuracy"] for r in got["runs"]] == [0.8, 0.9, None]  # each seed's score as it lands
    _finish(third, RunStatus.failed, error="out of memory", gpu_seconds=5)
    got = _get(client, sub, ann)
    assert (got["status"], got["accuracy"], got["accuracy_std"]) == ("failed", None, None)
    assert got["error"] == "out of memory" and got["failure_kind"] == "config"
    assert got["gpu_seconds"] == pytest.approx(25)


def test_one_seed_has_no_std_and_a_run_without_ece_leaves_the_mean_ece_null(client, contest):
    comp, ann = contest([0])
    sub = submit(client, comp, ann, lr=0.1, batch_size=32)["id"]
    _finish(*_runs(sub), accuracy=0.75, ece=0.04, gpu_seconds=10)
    got = _get(client, sub, ann)
    assert (got["accuracy"], got["accuracy_std"], got["ece"]) == (0.75, None, 0.04)

    comp, bob = contest([0, 1])
    sub = submit(client, comp, bob, lr=0.1, batch_size=32)["id"]
    with_ece, without = _runs(sub)
    _finish(with_ece, accuracy=0.6, ece=0.04, gpu_seconds=10)
    _finish(without, accuracy=0.7, gpu_seconds=10)  # a run stored before ECE was recorded
    got = _get(client, sub, bob)
    assert got["accuracy"] == pytest.approx(0.65) and got["accuracy_std"] == pytest.approx(0.0707107)
    assert got["ece"] is None
