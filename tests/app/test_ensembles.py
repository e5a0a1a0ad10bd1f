"""Ensemble entries: scored from the members' stored logits by averaging their softmax probabilities, seed by
seed, with no worker; refused (422, nothing stored) unless every member is the team's own succeeded, trained
submission; counted in the quota; never showing a private number.

The members are planted: submissions, runs, fp16 logits and the competition's test labels, on a test set of
8 images and 3 classes small enough to score by hand.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, update

from app.competitions.models import Competition, Membership, Team
from app.db import utcnow
from app.submissions.ensembles import score
from app.submissions.models import Run, RunLogits, Submission, TestLabels
from app.submissions.service import refresh_submission, run_spec
from tests.factories import join, make_competition, make_organizer
from worker.engine.config import TrainConfig
from worker.engine.evaluate import ece as engine_ece
from worker.engine.split import public_private_indices

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1])
PUBLIC, PRIVATE = (list(h) for h in public_private_indices(len(LABELS)))  # (1, 3, 5, 7), (0, 2, 4, 6)

# Each member's probabilities per image at seed position 0. A and B agree; C disagrees with them, confidently.
A0 = [[.7, .2, .1], [.45, .35, .2], [.7, .2, .1], [.35, .45, .2], [.4, .35, .25], [.01, .29, .7], [.1, .1, .8],
      [.2, .7, .1]]
C0 = [[.7, .2, .1], [.05, .9, .05], [.7, .2, .1], [.9, .05, .05], [.1, .8, .1], [.39, .6, .01], [.1, .1, .8],
      [.5, .4, .1]]
# By hand, the average of A, A and C per image, against the labels 0 1 2 0 1 2 0 1:
#   0: (.7 .2 .1) -> 0 right
#   1: (.317 .533 .15) -> 1 right (a majority vote says 0)
#   2: (.7 .2 .1) -> 0 wrong
#   3: (.533 .317 .15) -> 0 right (a majority vote says 1)
#   4: (.3 .5 .2) -> 1 right (a majority vote says 0)
#   5: (.137 .393 .47) -> 2 right (averaging logits instead says 1: C's .01 for class 2 weighs more)
#   6: (.1 .1 .8) -> 2 wrong
#   7: (.3 .6 .1) -> 1 right (C alone says 0)
# Public half (1, 3, 5, 7): 4 of 4 = 1.0, where a majority vote scores 0.5, averaged logits 0.75, A 0.5 and
# C 0.5. Private half (0, 2, 4, 6): 2 of 4 = 0.5.
# Seed position 1 is the same but for image 3, which every member now calls 1: the ensemble too, wrong,
# so its public accuracy is 0.75 and its private one 0.5 again.
IMAGE_3_AT_SEED_1 = [.1, .8, .1]
EXPECTED_CORRECT = {0: [1, 1, 0, 1, 1, 1, 0, 1], 1: [1, 1, 0, 0, 1, 1, 0, 1]}
EXPECTED_PUBLIC, EXPECTED_PRIVATE = {0: 1.0, 1: 0.75}, {0: 0.5, 1: 0.5}


def _at_seed(probs: list[list[float]], position: int) -> list[list[float]]:
    return [IMAGE_3_AT_SEED_1 if position == 1 and i == 3 else p for i, p in enumerate(probs)]


@pytest.fixture
def contest(client, admin_headers, db):
    """-> make(seeds, **competition) -> (competition JSON, {name: (headers, team id)}), with the test labels
    stored as the competition's first success would have stored them."""
    def make(seeds=(0, 1), **kw):
        comp = make_competition(client, make_organizer(client, admin_headers), seeds=list(seeds), **kw)
        teams = {}
        for name in ("ann", "bob"):
            headers = join(client, comp["slug"], name)
            teams[name] = (headers, db.scalar(select(Team.id).where(Team.competition_id == comp["id"],
                                                                    Team.name == f"team-{name}")))
        db.add(TestLabels(competition_id=comp["id"], rows=len(LABELS), data=LABELS.astype(np.uint8).tobytes()))
        db.commit()
        return comp, teams
    return make


def _plant(db, comp_id: int, team_id: int, probs_per_seed: list[list[list[float]]], *, status="succeeded",
           gpu_seconds=10.0, **columns) -> int:
    """A submission of `team_id` with one run per seed position, as workers would have left it: the runs'
    fp16 logits (log of the given probabilities) and their scores, then its state derived from them."""
    comp = db.get(Competition, comp_id)
    user_id = db.scalar(select(Membership.user_id).where(Membership.team_id == team_id))
    cfg = TrainConfig()
    sub = Submission(competition_id=comp_id, team_id=team_id, user_id=user_id, config=cfg.model_dump(mode="json"),
                     status=status, created_at=utcnow() - timedelta(minutes=5), **columns)
    db.add(sub)
    db.flush()
    for seed, probs in zip(comp.seeds, probs_per_seed, strict=False):
        spec = run_spec(comp, cfg, seed)
        logits = np.log(np.array(probs)).astype(np.float16)
        correct = logits.argmax(1) == LABELS
        run = Run(submission_id=sub.id, seed=seed, spec=spec, spec_hash=spec.identity(), queue="train.cpu",
                  status=status, attempts=1, gpu_seconds=gpu_seconds, charged_seconds=gpu_seconds,
                  finished_at=utcnow(), progress=1.0)
        if status == "succeeded":
            run.accuracy, run.private_accuracy = correct[PUBLIC].mean(), correct[PRIVATE].mean()
        db.add(run)
        db.flush()
        if status == "succeeded":
            db.add(RunLogits(run_id=run.id, rows=8, cols=3, dtype="float16", data=logits.tobytes(),
                             correct=np.packbits(correct).tobytes()))
    refresh_submission(db, sub.id)
    db.commit()
    return sub.id


def _three_members(db, comp, team_id) -> list[int]:
    return [_plant(db, comp["id"], team_id, [_at_seed(probs, k) for k in (0, 1)], gpu_seconds=gpu)
            for probs, gpu in ((A0, 10.0), (A0, 20.0), (C0, 30.0))]


def _post(client, comp, headers, members):
    return client.post(f"/api/competitions/{comp['slug']}/ensembles", json={"members": members}, headers=headers)


def _stored(db) -> tuple[int, int, int]:
    db.expire_all()
    return (db.scalar(select(func.count()).select_from(Submission)), db.scalar(select(func.count()).select_from(Run)),
            db.scalar(select(func.sum(Team.submissions))))


def test_an_ensemble_averages_probabilities_seed_by_seed_as_computed_by_hand(client, db, contest):
    comp, teams = contest()
    headers, team_id = teams["ann"]
    members = _three_members(db, comp, team_id)
    before = db.scalar(select(Team.submissions).where(Team.id == team_id))

    r = _post(client, comp, headers, members)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["members"], body["config"]) == ("ensemble", members, {"ensemble_of": members})
    assert body["status"] == "succeeded" and body["team_id"] == team_id
    # k = 2: the mean and the sample std of the two seed positions' public accuracies.
    assert body["accuracy"] == pytest.approx(0.875)
    assert body["accuracy_std"] == pytest.approx(0.25 / np.sqrt(2))
    # No training: nothing charged, nothing predicted, nothing queued; its GPU-seconds are the members'.
    assert body["charged_seconds"] == 0 and body["predicted_seconds"] == 0 and body["eta_seconds"] is None
    assert body["gpu_seconds"] == pytest.approx(2 * (10 + 20 + 30))
    assert not any("private" in k for k in body) and "private" not in r.text

    db.expire_all()
    sub = db.get(Submission, body["id"])
    assert sub.private_accuracy == pytest.approx(0.5) and sub.private_accuracy_std == pytest.approx(0.0)
    assert db.scalar(select(Team.submissions).where(Team.id == team_id)) == before + 1
    runs = sorted(sub.runs, key=lambda run: run.seed)
    assert [run.seed for run in runs] == [0, 1] and all(run.round == 0 for run in runs)
    for k, run in enumerate(runs):
        assert (run.status, run.charged_seconds, run.progress, run.attempts) == ("succeeded", 0, 1.0, 0)
        assert run.accuracy == pytest.approx(EXPECTED_PUBLIC[k])
        assert run.private_accuracy == pytest.approx(EXPECTED_PRIVATE[k])
        assert run.gpu_seconds == pytest.approx(60.0) and run.result is None
        # The averaged probabilities, by hand in float64: their ECE as the engine defines it.
        avg = np.mean([_at_seed(p, k) for p in (A0, A0, C0)], axis=0)
        for half, value in ((PUBLIC, run.ece), (PRIVATE, run.private_ece)):
            expected = engine_ece(torch.log(torch.tensor(avg[half])), torch.tensor(LABELS[half]))
            assert value == pytest.approx(expected, abs=2e-3)
        stored = db.get(RunLogits, run.id)
        log_probs = np.frombuffer(stored.data, dtype=np.float16).reshape(8, 3).astype(np.float64)
        np.testing.assert_allclose(np.exp(log_probs), avg, atol=2e-3)
        bits = np.unpackbits(np.frombuffer(stored.correct, dtype=np.uint8))[:8]
        assert bits.tolist() == EXPECTED_CORRECT[k]

    detail = client.get(f"/api/submissions/{body['id']}", headers=headers)
    assert detail.status_code == 200 and "private" not in detail.text
    assert [run["accuracy"] for run in detail.json()["runs"]] == pytest.approx([1.0, 0.75])


def test_the_numpy_ece_is_the_engines():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(200, 10)) * 3 for _ in range(3)]
    labels = rng.integers(0, 10, size=200)
    s = score(logits, labels)
    public = list(public_private_indices(200)[0])
    probs = np.mean([np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits], axis=0)
    assert s.ece == pytest.approx(engine_ece(torch.log(torch.tensor(probs[public])), torch.tensor(labels[public])))
    assert s.accuracy == pytest.approx((probs.argmax(1) == labels)[public].mean())


def test_members_that_cant_be_are_refused_by_name_and_nothing_is_stored(client, db, contest):
    comp, teams = contest()
    headers, team_id = teams["ann"]
    a, b, c = _three_members(db, comp, team_id)
    theirs = _plant(db, comp["id"], teams["bob"][1], [A0, A0])
    failed = _plant(db, comp["id"], team_id, [A0, A0], status="failed")
    running = _plant(db, comp["id"], team_id, [A0, A0], status="running")
    baseline = _plant(db, comp["id"], team_id, [A0, A0], is_baseline=True)
    one_seed = _plant(db, comp["id"], team_id, [A0])  # scored over 1 seed where the others have 2
    r = _post(client, comp, headers, [a, b])
    assert r.status_code == 201, r.text
    ensemble = r.json()["id"]
    stored = _stored(db)

    refused_by_schema = {"one member": [a], "six members": [a, b, c, theirs, failed, running],
                         "a duplicate": [a, b, a]}
    for why, members in refused_by_schema.items():
        r = _post(client, comp, headers, members)
        assert r.status_code == 422, why
        assert r.json()["detail"][0]["loc"][:2] == ["body", "members"], why
    refused = {theirs: "is not one of your team's submissions", 999999: "is not one of your team's submissions",
               failed: "is failed", running: "is running", baseline: "is a baseline",
               ensemble: "is an ensemble", one_seed: "was scored over 1 seed(s)"}
    for bad, why in refused.items():
        r = _post(client, comp, headers, [a, bad])
        assert r.status_code == 422, (bad, r.text)
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "members"] and f"submission {bad} {why}" in err["msg"], err
        assert "private" not in r.text
    # Every bad member is named at once; the choices offered are the team's own eligible submissions.
    err = _post(client, comp, headers, [theirs, a, failed]).json()["detail"][0]
    assert err["input"] == sorted([theirs, failed]) and f"submission {theirs}" in err["msg"]
    assert err["ctx"]["allowed"] == [str(i) for i in sorted([a, b, c, one_seed])]
    assert _stored(db) == stored


def test_an_ensemble_counts_against_the_quota(client, db, contest):
    comp, teams = contest(submission_quota=3)
    headers, team_id = teams["ann"]
    a, b = (_plant(db, comp["id"], team_id, [A0, A0]) for _ in range(2))
    assert _post(client, comp, headers, [a, b]).status_code == 201
    stored = _stored(db)
    r = _post(client, comp, headers, [a, b])
    assert r.status_code == 429 and "quota of 3 submissions used" in r.json()["detail"]
    assert _stored(db) == stored


def test_closed_competitions_and_unknown_test_labels_refuse_an_ensemble(client, db, contest):
    comp, teams = contest()
    headers, team_id = teams["ann"]
    a, b = (_plant(db, comp["id"], team_id, [A0, A0]) for _ in range(2))
    db.execute(update(Competition).where(Competition.id == comp["id"]).values(deadline=utcnow() - timedelta(hours=1)))
    db.commit()
    stored = _stored(db)
    r = _post(client, comp, headers, [a, b])
    assert r.status_code == 409 and "closed" in r.json()["detail"]

    db.execute(update(Competition).where(Competition.id == comp["id"]).values(deadline=None))
    db.execute(TestLabels.__table__.delete())
    db.commit()
    r = _post(client, comp, headers, [a, b])
    assert r.status_code == 409 and "no stored test labels" in r.json()["detail"]
    assert _stored(db) == stored
