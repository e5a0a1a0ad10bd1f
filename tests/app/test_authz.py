"""The authorisation matrix: every route x six roles, each cell the status it must answer.

A route added without its row fails `test_every_route_has_a_row`. Each cell runs against a fresh world
(competitions, teams, a submission, users), so a cell that changes state (a cancel, a token rotation) can't
change the answer of the next one. The bootstrap admin is the one account all worlds share: its cells come
last in ROLES, and the app restores its token at the next test's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.main import create_app
from tests.factories import competition_payload, join, make_competition, make_organizer

pytestmark = pytest.mark.slow

ROLES = ("anonymous", "same_team", "other_team", "other_organizer", "organizer", "admin")


@dataclass
class World:
    slug: str  # competition A, run by `organizer`
    submission_id: int  # submitted to A by a member of team T1
    target_user_id: int  # that member (what the admin token routes act on)
    headers: dict[str, dict[str, str]]  # role -> request headers


def _world(client, admin_headers) -> World:
    org_a, org_b = make_organizer(client, admin_headers, "org-a"), make_organizer(client, admin_headers, "org-b")
    comp = make_competition(client, org_a)
    make_competition(client, org_b)
    author = join(client, comp["slug"], name="author", team="t1")
    mate = join(client, comp["slug"], name="mate", team="t1", invite_code=author["X-Invite-Code"])
    rival = join(client, comp["slug"], name="rival", team="t2")
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                    headers=author)
    assert r.status_code == 201, r.text
    auth = {k: v for k, v in author.items() if k == "Authorization"}
    return World(slug=comp["slug"], submission_id=r.json()["id"],
                 target_user_id=client.get("/api/me", headers=auth).json()["id"],
                 headers={"anonymous": {}, "same_team": mate, "other_team": rival, "other_organizer": org_b,
                          "organizer": org_a, "admin": admin_headers})


def _new_competition() -> dict:
    return competition_payload()


# (method, OpenAPI path) -> (how to call it in a world, expected status per role in ROLES order)
MATRIX: dict[tuple[str, str], tuple] = {
    ("get", "/api/health"): (lambda w: ("/api/health", None), (200, 200, 200, 200, 200, 200)),
    ("get", "/api/competitions"): (lambda w: ("/api/competitions", None), (200, 200, 200, 200, 200, 200)),
    ("post", "/api/competitions"): (lambda w: ("/api/competitions", _new_competition()),
                                    (401, 403, 403, 201, 201, 201)),
    ("get", "/api/competitions/{slug}"): (lambda w: (f"/api/competitions/{w.slug}", None),
                                          (200, 200, 200, 200, 200, 200)),
    # Anyone may join with a fresh name; a participant already in a team of this competition may not.
    ("post", "/api/competitions/{slug}/join"): (
        lambda w: (f"/api/competitions/{w.slug}/join", {"name": "newcomer", "team": "new-team"}),
        (201, 409, 409, 201, 201, 201)),
    # Only members submit, each for their own team; organizers and admins are not members.
    ("post", "/api/competitions/{slug}/submissions"): (
        lambda w: (f"/api/competitions/{w.slug}/submissions", {"config": {"batch_size": 32}}),
        (401, 201, 201, 403, 403, 403)),
    ("get", "/api/competitions/{slug}/leaderboard"): (lambda w: (f"/api/competitions/{w.slug}/leaderboard", None),
                                                      (200, 200, 200, 200, 200, 200)),
    # The private board: its organizer and admins before the close; everyone after it (the world is open).
    ("get", "/api/competitions/{slug}/leaderboard/export"): (
        lambda w: (f"/api/competitions/{w.slug}/leaderboard/export?board=private", None),
        (403, 403, 403, 403, 200, 200)),
    # The rules are the competition's organizer's (or an admin's) to change.
    ("patch", "/api/competitions/{slug}"): (lambda w: (f"/api/competitions/{w.slug}", {"final_entries": 3}),
                                            (401, 403, 403, 403, 200, 200)),
    ("get", "/api/competitions/{slug}/final-entries"): (lambda w: (f"/api/competitions/{w.slug}/final-entries", None),
                                                        (401, 200, 200, 403, 403, 403)),
    ("put", "/api/competitions/{slug}/final-entries"): (
        lambda w: (f"/api/competitions/{w.slug}/final-entries", {"submission_ids": []}),
        (401, 200, 200, 403, 403, 403)),
    ("post", "/api/competitions/{slug}/baselines"): (
        lambda w: (f"/api/competitions/{w.slug}/baselines", {"config": {"batch_size": 32}}),
        (401, 403, 403, 403, 201, 201)),
    # An ensemble names the caller's team's succeeded submissions: the world's one is queued (422 for its
    # team; another team's id is refused the same way, as if it did not exist).
    ("post", "/api/competitions/{slug}/ensembles"): (
        lambda w: (f"/api/competitions/{w.slug}/ensembles", {"members": [w.submission_id, w.submission_id + 1]}),
        (401, 422, 422, 403, 403, 403)),
    ("post", "/api/competitions/{slug}/rescores"): (
        lambda w: (f"/api/competitions/{w.slug}/rescores", {"submission_ids": [w.submission_id]}),
        (401, 403, 403, 403, 422, 422)),
    ("get", "/api/competitions/{slug}/rescores"): (lambda w: (f"/api/competitions/{w.slug}/rescores", None),
                                                   (401, 403, 403, 403, 200, 200)),
    ("get", "/api/competitions/{slug}/rescores/{rescore_id}"): (
        lambda w: (f"/api/competitions/{w.slug}/rescores/1", None), (401, 403, 403, 403, 404, 404)),
    # A team's budget is seen by its members (each team its own); organizers and admins are not members.
    ("get", "/api/competitions/{slug}/budget"): (lambda w: (f"/api/competitions/{w.slug}/budget", None),
                                                 (401, 200, 200, 403, 403, 403)),
    ("get", "/api/submissions"): (lambda w: ("/api/submissions", None), (401, 200, 200, 200, 200, 200)),
    # A submission is its team's, readable by its competition's organizer and admins: anyone else gets the
    # same 404 as for an id that does not exist. Only its team may cancel it.
    ("get", "/api/submissions/{submission_id}"): (lambda w: (f"/api/submissions/{w.submission_id}", None),
                                                  (401, 200, 404, 404, 200, 200)),
    ("post", "/api/submissions/{submission_id}/cancel"): (
        lambda w: (f"/api/submissions/{w.submission_id}/cancel", None), (401, 200, 404, 404, 404, 404)),
    ("get", "/api/me"): (lambda w: ("/api/me", None), (401, 200, 200, 200, 200, 200)),
    ("post", "/api/me/token"): (lambda w: ("/api/me/token", None), (401, 200, 200, 200, 200, 200)),
    ("delete", "/api/me/token"): (lambda w: ("/api/me/token", None), (401, 204, 204, 204, 204, 204)),
    ("post", "/api/admin/users"): (lambda w: ("/api/admin/users", {"name": "new-org", "role": "organizer"}),
                                   (401, 403, 403, 403, 403, 201)),
    ("get", "/api/admin/workers"): (lambda w: ("/api/admin/workers", None), (401, 403, 403, 403, 403, 200)),
    ("get", "/api/admin/audit"): (lambda w: ("/api/admin/audit", None), (401, 403, 403, 403, 403, 200)),
    # Organizers read the classes (they name one in each competition); only admins define them.
    ("get", "/api/admin/hardware-classes"): (lambda w: ("/api/admin/hardware-classes", None),
                                             (401, 403, 403, 200, 200, 200)),
    ("put", "/api/admin/hardware-classes/{name}"): (
        lambda w: (f"/api/admin/hardware-classes/{w.slug}", {"device_type": "cpu", "train_images_per_sec": 10,
                                                             "eval_images_per_sec": 40}),
        (401, 403, 403, 403, 403, 201)),
    ("post", "/api/admin/users/{user_id}/token"): (lambda w: (f"/api/admin/users/{w.target_user_id}/token", None),
                                                   (401, 403, 403, 403, 403, 200)),
    ("delete", "/api/admin/users/{user_id}/token"): (
        lambda w: (f"/api/admin/users/{w.target_user_id}/token", None), (401, 403, 403, 403, 403, 204)),
}


def _routes() -> set[tuple[str, str]]:
    return {(method, path) for path, ops in create_app().openapi()["paths"].items() for method in ops}


def test_every_route_has_a_row():
    assert _routes() - set(MATRIX) == set(), "a route without a row in the authorisation matrix"
    assert set(MATRIX) - _routes() == set(), "a row for a route that no longer exists"


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0].upper()} {r[1]}")
def test_each_role_gets_its_status(client, admin_headers, route):
    call, expected = MATRIX[route]
    got = {}
    for role in ROLES:
        world = _world(client, admin_headers)
        path, body = call(world)
        r = client.request(route[0].upper(), path, json=body, headers=world.headers[role])
        got[role] = r.status_code
    assert got == dict(zip(ROLES, expected, strict=True))
