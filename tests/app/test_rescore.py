"""Rescore (app.submissions.rescore): an organizer re-runs entries with fresh seeds; the old runs stay, the
entry's score moves to the new round once all its new runs succeeded, the team pays nothing, and Kendall tau
between the scores before and after is reported over the pairs further apart than the threshold. Runs are
claimed and finished the way a worker does it (app.submissions.runs), with planted accuracies."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select, update

from app.db import session_scope
from app.submissions import runs as run_service
from app.submissions.models import Run, RunStatus, Submission
from tests.factories import SubmissionFactory, bind, join, make_competition, make_organizer, submit

_lr = itertools.count(1)


@pytest.fixture
def contest(client, admin_headers):
    """make(seeds, teams) -> (competition, its organizer's headers, {team: a member's headers})."""
    def make(seeds, teams):
        n = next(_lr)
        org = make_organizer(client, admin_headers, f"prof-{n}")
        comp = make_competition(client, org, seeds=seeds, gpu_hour_budget=10.0)
        return comp, org, {t: join(client, comp["slug"], f"{t}-user-{n}", team=t) for t in teams}
    return make


def _runs(submission_id: int, round_: int) -> list[int]:
    with session_scope() as s:
        return list(s.scalars(select(Run.id).where(Run.submission_id == submission_id, Run.round == round_)
                              .order_by(Run.seed)))


def _finish(run_id: int, accuracy: float | None, private: float | None = None, gpu_seconds: float = 100.0,
            status=RunStatus.succeeded) -> None:
    with session_scope() as s:
        c = run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3)
        assert isinstance(c, run_service.Claimed), c
    fields = {"error": "node fault"} if status == RunStatus.failed else {
        "accuracy": accuracy, "private_accuracy": private}
    with session_scope() as s:
        assert run_service.finish(s, c, status, gpu_seconds=gpu_seconds, **fields) is None


def _land(client, comp, headers, round_scores: list[tuple[float, float]]) -> int:
    """Submit, and finish its runs (one per seed) with these (public, private) accuracies."""
    sub = submit(client, comp, headers, lr=0.05 + next(_lr) / 1000, batch_size=32)["id"]
    for run_id, (acc, priv) in zip(_runs(sub, 0), round_scores, strict=True):
        _finish(run_id, acc, priv)
    return sub


def _rescore(client, comp, headers, expect=201, **body) -> dict:
    r = client.post(f"/api/competitions/{comp['slug']}/rescores", json=body, headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


def _report(client, comp, headers, rescore_id) -> dict:
    r = client.get(f"/api/competitions/{comp['slug']}/rescores/{rescore_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _sub(client, sub_id, headers) -> dict:
    r = client.get(f"/api/submissions/{sub_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_rescore_keeps_the_old_runs_and_moves_the_score_once_every_new_run_succeeded(client, contest):
    comp, org, teams = contest([0, 1], ["a"])
    a = teams["a"]
    sub = _land(client, comp, a, [(0.80, 0.70), (0.82, 0.72)])
    budget = client.get(f"/api/competitions/{comp['slug']}/budget", headers=a).json()
    before = _sub(client, sub, a)

    rescore = _rescore(client, comp, org, submission_ids=[sub])
    assert (rescore["round"], rescore["seeds"], rescore["submission_ids"]) == (1, [2, 3], [sub])
    assert rescore["status"] == "running" and rescore["public"] is None
    [entry] = rescore["entries"]
    assert entry["before_accuracy"] == pytest.approx(0.81) and entry["after_accuracy"] is None
    assert entry["before_private_accuracy"] == pytest.approx(0.71)  # the organizer may see the private half

    # The old runs are kept, the new ones queued with fresh seeds; the score is as it was meanwhile, and the
    # team's budget neither reserves nor spends anything for them.
    got = _sub(client, sub, a)
    assert [(r["seed"], r["round"], r["status"]) for r in got["runs"]] == [
        (0, 0, "succeeded"), (1, 0, "succeeded"), (2, 1, "queued"), (3, 1, "queued")]
    assert {k: got[k] for k in ("status", "accuracy", "accuracy_std", "round")} == {
        "status": "succeeded", "accuracy": before["accuracy"], "accuracy_std": before["accuracy_std"], "round": 0}
    assert client.get(f"/api/competitions/{comp['slug']}/budget", headers=a).json() == budget
    # The rescore is the organizer's: the team can't cancel its runs (and so keep a lucky score).
    r = client.post(f"/api/submissions/{sub}/cancel", headers=a)
    assert r.status_code == 409, r.text
    assert [r["status"] for r in _sub(client, sub, a)["runs"] if r["round"] == 1] == ["queued", "queued"]

    first, second = _runs(sub, 1)
    _finish(first, 0.86, 0.76)
    assert _sub(client, sub, a)["accuracy"] == before["accuracy"]  # half a round changes nothing
    assert _report(client, comp, org, rescore["id"])["status"] == "running"
    _finish(second, 0.84, 0.74)

    got = _sub(client, sub, a)
    assert got["round"] == 1 and got["status"] == "succeeded"
    assert got["accuracy"] == pytest.approx(0.85) and got["accuracy_std"] == pytest.approx(0.0141421, abs=1e-6)
    assert got["charged_seconds"] == before["charged_seconds"]  # the rescore's runs are charged 0
    assert [r["charged_seconds"] for r in got["runs"]] == [100.0, 100.0, 0.0, 0.0]
    assert client.get(f"/api/competitions/{comp['slug']}/budget", headers=a).json() == budget
    done = _report(client, comp, org, rescore["id"])
    assert done["status"] == "done" and done["failed"] == []
    assert done["entries"][0]["after_accuracy"] == pytest.approx(0.85)
    assert done["entries"][0]["after_private_accuracy"] == pytest.approx(0.75)
    assert done["public"] == {"tau": None, "pairs": 0, "concordant": 0, "discordant": 0, "tied_after": 0,
                              "within_threshold": 0}  # one entry: no pair


def test_kendall_tau_over_the_pairs_beyond_the_threshold(client, contest):
    """Four entries, one pair (a, b) swapped by the rescore; e's new run fails.

    Public, before a .90, b .85, c .80, d .70; after a .86, b .87, c .79, d .72. Of the 6 pairs only (a, b)
    is reversed: tau = (5 - 1) / 6 = 2/3. With threshold .06, (a, b) and (b, c) (.05 apart) are left out and
    the other 4 agree: tau = 1.
    Private, before a .88, b .84, c .79, d .71; after a .85, b .86, c .80, d .80: (a, b) reversed, (c, d)
    tied after (neither), the other 4 agree: tau = (4 - 1) / 5 = 3/5.
    """
    comp, org, teams = contest([0], ["a", "b", "c", "d", "e"])
    before = {"a": (0.90, 0.88), "b": (0.85, 0.84), "c": (0.80, 0.79), "d": (0.70, 0.71), "e": (0.60, 0.60)}
    after = {"a": (0.86, 0.85), "b": (0.87, 0.86), "c": (0.79, 0.80), "d": (0.72, 0.80), "e": None}
    subs = {t: _land(client, comp, teams[t], [before[t]]) for t in teams}

    # Two rescores started back to back: both compare against the same scores before.
    loose = _rescore(client, comp, org)  # the default: every team's final entry (none marked: its best)
    strict = _rescore(client, comp, org, threshold=0.06)
    assert loose["submission_ids"] == strict["submission_ids"] == sorted(subs.values())
    assert (loose["round"], loose["seeds"], strict["round"], strict["seeds"]) == (1, [1], 2, [2])
    for t, sub in subs.items():
        for round_ in (1, 2):
            [run_id] = _runs(sub, round_)
            if after[t] is None:
                _finish(run_id, None, status=RunStatus.failed)
            else:
                _finish(run_id, *after[t])

    report = _report(client, comp, org, loose["id"])
    assert report["status"] == "done" and report["failed"] == [subs["e"]]
    assert report["public"] == {"tau": pytest.approx(2 / 3), "pairs": 6, "concordant": 5, "discordant": 1,
                                "tied_after": 0, "within_threshold": 0}
    assert report["private"] == {"tau": pytest.approx(3 / 5), "pairs": 6, "concordant": 4, "discordant": 1,
                                 "tied_after": 1, "within_threshold": 0}
    report = _report(client, comp, org, strict["id"])
    assert report["public"] == {"tau": 1.0, "pairs": 4, "concordant": 4, "discordant": 0, "tied_after": 0,
                                "within_threshold": 2}
    # Every score now comes from the last round that fully succeeded; e's stays as it was.
    for t, sub in subs.items():
        got = _sub(client, sub, teams[t])
        want = before[t][0] if after[t] is None else after[t][0]
        assert (got["status"], got["accuracy"], got["round"]) == ("succeeded", want, 0 if after[t] is None else 2)
    listed = client.get(f"/api/competitions/{comp['slug']}/rescores", headers=org).json()
    assert [r["id"] for r in listed] == [strict["id"], loose["id"]]


def test_the_default_is_each_teams_final_entries_or_its_best(client, db, contest):
    comp, org, teams = contest([0], ["a", "b"])
    a_best = _land(client, comp, teams["a"], [(0.90, 0.9)])
    a_final = _land(client, comp, teams["a"], [(0.80, 0.8)])
    b_best = _land(client, comp, teams["b"], [(0.85, 0.8)])
    _land(client, comp, teams["b"], [(0.75, 0.7)])
    db.execute(update(Submission).where(Submission.id == a_final).values(final=True))
    db.commit()
    chosen = _rescore(client, comp, org)["submission_ids"]
    assert chosen == [a_final, b_best] and a_best not in chosen


def test_only_the_competitions_organizer_or_an_admin_may_rescore(client, admin_headers, contest):
    comp, org, teams = contest([0], ["a"])
    sub = _land(client, comp, teams["a"], [(0.8, 0.8)])
    other = make_organizer(client, admin_headers, "other-prof")
    rescore = _rescore(client, comp, org, submission_ids=[sub])
    base = f"/api/competitions/{comp['slug']}/rescores"
    for headers, want in (({}, 401), (teams["a"], 403), (other, 403)):
        assert client.post(base, json={"submission_ids": [sub]}, headers=headers).status_code == want
        assert client.get(base, headers=headers).status_code == want
        assert client.get(f"{base}/{rescore['id']}", headers=headers).status_code == want
    assert _rescore(client, comp, admin_headers, submission_ids=[sub])["round"] == 2
    assert client.get(f"{base}/{rescore['id']}", headers=admin_headers).status_code == 200
    assert client.get(f"{base}/999", headers=org).status_code == 404


def test_what_cannot_be_rescored_is_refused_naming_it(client, db, contest):
    comp, org, teams = contest([0], ["a"])
    done = _land(client, comp, teams["a"], [(0.8, 0.8)])
    queued = submit(client, comp, teams["a"], lr=0.5, batch_size=32)["id"]
    bind(db)
    with session_scope() as s:
        team_id, user_id = s.execute(select(Submission.team_id, Submission.user_id)
                                     .where(Submission.id == done)).one()
    ensemble = SubmissionFactory(competition_id=comp["id"], team_id=team_id, user_id=user_id, accuracy=0.9,
                                 gpu_seconds=0.0, kind="ensemble", members=[done, queued]).id
    other_comp, other_org, other_teams = contest([0], ["z"])
    elsewhere = _land(client, other_comp, other_teams["z"], [(0.5, 0.5)])

    def refused(body, field, value, words):
        r = client.post(f"/api/competitions/{comp['slug']}/rescores", json=body, headers=org)
        assert r.status_code == 422, r.text
        [err] = r.json()["detail"]
        assert err["loc"] == ["body", field] and err["input"] == value and words in err["msg"], err

    refused({"submission_ids": [done, ensemble]}, "submission_ids", ensemble, f"submission {ensemble} is an ensemble")
    refused({"submission_ids": [queued]}, "submission_ids", queued, f"submission {queued} is queued")
    refused({"submission_ids": [elsewhere]}, "submission_ids", elsewhere, f"no submission {elsewhere}")
    refused({"submission_ids": [done], "seeds": [0, 7]}, "seeds", [0], "already used")
    for body in ({"submission_ids": []}, {"submission_ids": [done, done]}, {"threshold": -0.1},
                 {"seeds": [5, 5]}, {"threshold": "nan"}):
        assert client.post(f"/api/competitions/{comp['slug']}/rescores", json=body,
                           headers=org).status_code == 422, body
    got = _rescore(client, comp, org, submission_ids=[done], seeds=[7, 8])
    assert got["seeds"] == [7, 8] and [e["submission_id"] for e in got["entries"]] == [done]
