"""Final entries: what a team marks before the deadline, and what the private board judges it on."""

from __future__ import annotations

import itertools
from datetime import timedelta

from sqlalchemy import select

from app.db import session_scope, utcnow
from app.submissions import runs as run_service
from app.submissions.models import Run, RunStatus
from tests.factories import join, make_competition, make_organizer

_lr = itertools.count(1)


def _submit(client, comp, headers) -> int:
    """A config of its own each time: an identical one would reuse the earlier run's result (dedup)."""
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"lr": 0.05 + next(_lr) / 1000, "batch_size": 32}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _land(client, comp, headers, accuracy, status=RunStatus.succeeded) -> int:
    """A submission finished the way a worker finishes one."""
    sub = _submit(client, comp, headers)
    with session_scope() as s:
        run_id = s.scalar(select(Run.id).where(Run.submission_id == sub))
        claimed = run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3)
    with session_scope() as s:
        assert run_service.finish(s, claimed, status, accuracy=accuracy, gpu_seconds=100.0) is None
    return sub


def _url(comp):
    return f"/api/competitions/{comp['slug']}/final-entries"


def _get(client, comp, headers) -> dict:
    r = client.get(_url(comp), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _put(client, comp, headers, ids, expect=200) -> dict:
    r = client.put(_url(comp), json={"submission_ids": ids}, headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


def _contest(client, admin_headers, **rules):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, **rules)
    return org, comp, join(client, comp["slug"], name="ann", team="owls"), join(client, comp["slug"], name="bo",
                                                                                 team="larks")


def test_without_a_choice_the_best_public_entry_is_used(client, admin_headers):
    _, comp, owls, _ = _contest(client, admin_headers)
    assert _get(client, comp, owls) == {"limit": 2, "chosen": [], "effective": [], "default_used": True,
                                        "locked": False}
    _land(client, comp, owls, 0.70)
    best = _land(client, comp, owls, 0.80)
    _land(client, comp, owls, 0.75)
    _land(client, comp, owls, 0.99, status=RunStatus.diverged)  # never an entry
    assert _get(client, comp, owls) == {"limit": 2, "chosen": [], "effective": [best], "default_used": True,
                                        "locked": False}


def test_an_explicit_choice_replaces_the_default_and_the_last_choice(client, admin_headers):
    _, comp, owls, _ = _contest(client, admin_headers)
    worse = _land(client, comp, owls, 0.70)
    best = _land(client, comp, owls, 0.80)
    queued = _submit(client, comp, owls)  # still training: may be chosen, it is not done badly
    got = _put(client, comp, owls, [queued, worse])
    # Judged on what has a score: the queued one counts once it succeeds.
    assert got == {"limit": 2, "chosen": sorted([queued, worse]), "effective": [worse],
                   "default_used": False, "locked": False}
    assert _get(client, comp, owls) == got
    # A new choice replaces the old one whole.
    assert _put(client, comp, owls, [best])["chosen"] == [best]
    # Choosing none goes back to the default.
    cleared = _put(client, comp, owls, [])
    assert (cleared["chosen"], cleared["effective"], cleared["default_used"]) == ([], [best], True)


def test_teammates_share_one_choice(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    ann = join(client, comp["slug"], name="ann", team="owls")
    cy = join(client, comp["slug"], name="cy", team="owls", invite_code=ann["X-Invite-Code"])
    sub = _land(client, comp, ann, 0.7)
    _put(client, comp, cy, [sub])
    assert _get(client, comp, ann)["chosen"] == [sub]


def test_at_most_the_competitions_limit(client, admin_headers):
    org, comp, owls, _ = _contest(client, admin_headers, final_entries=3)
    subs = [_land(client, comp, owls, 0.5 + i / 100) for i in range(4)]
    r = client.put(_url(comp), json={"submission_ids": subs}, headers=owls)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "submission_ids"]
    assert "at most 3" in r.json()["detail"][0]["msg"]
    assert _put(client, comp, owls, subs[:3])["chosen"] == subs[:3]
    # The organizer lowers the limit: the next choice must fit it.
    assert client.patch(f"/api/competitions/{comp['slug']}", json={"final_entries": 1}, headers=org).status_code \
        == 200
    assert _get(client, comp, owls)["limit"] == 1
    _put(client, comp, owls, subs[:2], expect=422)
    assert _put(client, comp, owls, subs[3:])["chosen"] == subs[3:]


def test_only_the_teams_own_usable_submissions(client, admin_headers):
    org, comp, owls, larks = _contest(client, admin_headers)
    mine = _land(client, comp, owls, 0.7)
    theirs = _land(client, comp, larks, 0.9)
    failed = _land(client, comp, owls, None, status=RunStatus.failed)
    other_comp = make_competition(client, org)
    elsewhere = _land(client, other_comp, join(client, other_comp["slug"], name="ann2", team="owls"), 0.6)
    baseline = client.post(f"/api/competitions/{comp['slug']}/baselines", json={"config": {"batch_size": 32}},
                           headers=org).json()["id"]

    for bad in (theirs, elsewhere, baseline, 10**6):
        r = client.put(_url(comp), json={"submission_ids": [mine, bad]}, headers=owls)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "submission_ids"]
        assert str(bad) in r.json()["detail"][0]["msg"]
    r = client.put(_url(comp), json={"submission_ids": [failed]}, headers=owls)
    assert r.status_code == 422 and "failed" in r.json()["detail"][0]["msg"]
    r = client.put(_url(comp), json={"submission_ids": [mine, mine]}, headers=owls)
    assert r.status_code == 422 and "distinct" in r.text
    # Nothing changed by the refused requests; the other team's choice is its own.
    assert _get(client, comp, owls)["chosen"] == []
    assert _get(client, comp, larks)["effective"] == [theirs]


def test_members_only(client, admin_headers):
    org, comp, owls, _ = _contest(client, admin_headers)
    assert client.get(_url(comp)).status_code == 401
    assert client.put(_url(comp), json={"submission_ids": []}).status_code == 401
    assert client.get(_url(comp), headers=org).status_code == 403
    assert client.put(_url(comp), json={"submission_ids": []}, headers=org).status_code == 403
    assert client.get("/api/competitions/nope/final-entries", headers=owls).status_code == 404


def test_locked_after_the_deadline(client, admin_headers, clock):
    deadline = (utcnow() + timedelta(hours=1)).isoformat()
    _, comp, owls, _ = _contest(client, admin_headers, deadline=deadline)
    sub = _land(client, comp, owls, 0.7)
    _put(client, comp, owls, [sub])

    clock(timedelta(hours=2))
    r = client.put(_url(comp), json={"submission_ids": []}, headers=owls)
    assert r.status_code == 409 and "final entries are locked since" in r.json()["detail"]
    got = _get(client, comp, owls)
    assert (got["chosen"], got["locked"]) == ([sub], True)


def test_choices_are_audited(client, admin_headers):
    _, comp, owls, _ = _contest(client, admin_headers)
    sub = _land(client, comp, owls, 0.7)
    _put(client, comp, owls, [sub])
    event = client.get("/api/admin/audit", headers=admin_headers).json()[0]
    assert (event["actor_name"], event["action"], event["target"]) == ("ann", "final_entries.set",
                                                                     f"competition:{comp['slug']}")
    assert event["detail"]["submission_ids"] == [sub]
