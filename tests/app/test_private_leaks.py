"""No participant-facing endpoint shows a private number or another team's config before the close.

Every route of the OpenAPI document is called (a route this file does not know fails the test, so a new one
can't be forgotten), as an anonymous reader and as a member of each team, with every query variant that
selects a board, while the competition is open and again while frozen. The private numbers are planted
with digits nothing else produces, and each body is searched for them, and for the other team's config.
"""

from __future__ import annotations

import json
import random
import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import db as app_db
from app.db import session_scope, utcnow
from app.main import create_app
from app.submissions.models import Run, Submission
from tests.factories import join, land, make_competition, make_organizer
from worker.engine.split import public_private_indices

pytestmark = pytest.mark.slow

N = 400
LABELS = [i % 10 for i in range(N)]
LR = {"t1": 0.0123457, "t2": 0.0876543}  # each team's config, which the other must not see
PRIVATE = {"t1": (0.1234567, 0.0424242), "t2": (0.2345671, 0.0535353)}  # (private accuracy, private ECE)


def _world(client, admin_headers):
    org = make_organizer(client, admin_headers)
    now = utcnow()
    comp = make_competition(client, org, seeds=[0, 1], freeze_at=(now + timedelta(hours=1)).isoformat(),
                            deadline=(now + timedelta(hours=2)).isoformat())
    teams = {t: join(client, comp["slug"], name=f"{t}-user", team=t) for t in ("t1", "t2")}
    subs = {}
    public = set(public_private_indices(N)[0])
    for t, h in teams.items():
        rng = random.Random(t)
        subs[t] = []
        for k in range(2):
            # Right on most public images and few private ones: an ensemble's private accuracy can't
            # coincide with a public number.
            correct = [rng.random() < (0.9 if i in public else 0.3) for i in range(N)]
            acc, ece = PRIVATE[t]
            subs[t].append(land(client, comp, h, {"correct": correct, "labels": LABELS, "accuracy": 0.5 + k / 10,
                                                  "private_accuracy": acc, "private_ece": ece, "ece": 0.01},
                                lr=LR[t] * (k + 1), batch_size=32))
    r = client.post(f"/api/competitions/{comp['slug']}/ensembles", json={"members": subs["t1"]},
                    headers=teams["t1"])
    assert r.status_code == 201, r.text
    subs["t1"].append(r.json()["id"])
    return comp, org, teams, subs


def _markers() -> set[float]:
    """Every private number stored."""
    out: set[float] = set()
    with session_scope() as s:
        for row in s.execute(select(Submission.private_accuracy, Submission.private_ece,
                                    Submission.private_accuracy_std)):
            out |= {v for v in row if v}
        for row in s.execute(select(Run.private_accuracy, Run.private_ece)):
            out |= {v for v in row if v}
    return out


def _config_markers(team: str) -> set[float]:
    return {LR[team] * k for k in (1, 2)}


def _numbers(text: str) -> set[float]:
    """Every number written in a body (JSON or CSV)."""
    return {float(m) for m in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)}


# Query variants of the routes that take one; a request body for every route that takes one.
QUERIES = {
    "/api/competitions/{slug}/leaderboard": [{}, {"board": "private"}, {"view": "efficiency"},
                                             {"board": "private", "view": "efficiency"}],
    "/api/competitions/{slug}/leaderboard/export": [{"format": f, "board": b} for f in ("csv", "json")
                                                    for b in ("public", "private")],
    "/api/submissions": [{}, {"competition": "{slug}"}],
}


def _bodies(subs, mine: str) -> dict[tuple[str, str], list]:
    own, other = subs[mine], subs["t2" if mine == "t1" else "t1"]
    return {
        ("post", "/api/competitions"): [{}],
        ("patch", "/api/competitions/{slug}"): [{"reveal_configs": True}],
        ("put", "/api/competitions/{slug}/final-entries"): [{"submission_ids": own[:1]},
                                                            {"submission_ids": other[:1]}, {}],
        ("post", "/api/competitions/{slug}/baselines"): [{"config": {"batch_size": 32}}],
        ("post", "/api/competitions/{slug}/join"): [{"name": "x", "team": "t3"}],
        ("post", "/api/competitions/{slug}/submissions"): [{"config": {"batch_size": 32, "lr": 0.0501}},
                                                           {"config": {"lr": 99.0}}],
        ("post", "/api/competitions/{slug}/ensembles"): [{"members": own[:2]}, {"members": other[:2]},
                                                         {"members": [own[0], other[0]]}],
        ("post", "/api/competitions/{slug}/rescores"): [{"submission_ids": None}],
        ("post", "/api/admin/users"): [{"name": "y", "role": "organizer"}],
        ("put", "/api/admin/hardware-classes/{name}"): [{"device_type": "cpu"}],
    }


def _calls(spec, comp, subs, mine):
    """(method, url, body) for every route and variant, as a member of team `mine` would try them."""
    bodies = _bodies(subs, mine)
    ids = {"slug": comp["slug"], "rescore_id": 1, "name": "cpu", "user_id": 1}
    for path, ops in spec["paths"].items():
        for method in ops:
            variants = bodies.get((method, path), [None])
            if method in ("post", "put", "patch") and (method, path) not in bodies and path not in (
                    "/api/me/token", "/api/submissions/{submission_id}/cancel", "/api/admin/users/{user_id}/token"):
                raise AssertionError(f"{method.upper()} {path}: give it a body in _bodies")
            for sub_id in (subs["t1"] + subs["t2"]) if "{submission_id}" in path else [None]:
                url = path.format(**ids, submission_id=sub_id)
                for query in QUERIES.get(path, [{}]):
                    q = {k: v.format(**ids) for k, v in query.items()}
                    for body in variants:
                        yield method, url, q, body


@pytest.mark.parametrize("frozen", [False, True], ids=["open", "frozen"])
def test_no_participant_endpoint_leaks_a_private_number_or_another_teams_config(client, db, admin_headers,
                                                                                 frozen):
    comp, org, teams, subs = _world(client, admin_headers)
    private = _markers()
    assert len(private) >= 4
    # The search finds them where they may be shown: the organizer's private export.
    shown = client.get(f"/api/competitions/{comp['slug']}/leaderboard/export",
                       params={"board": "private", "format": "csv"}, headers=org).text
    assert set(PRIVATE["t2"]) <= _numbers(shown)
    spec = create_app().openapi()
    try:
        if frozen:
            app_db.CLOCK_OFFSET[0] = timedelta(hours=1, minutes=1)
        for viewer in ("anonymous", "t1", "t2"):
            headers = {} if viewer == "anonymous" else {"Authorization": teams[viewer]["Authorization"]}
            hidden = private | {m for t in ("t1", "t2") if t != viewer for m in _config_markers(t)}
            calls = list(_calls(spec, comp, subs, "t1" if viewer == "anonymous" else viewer))
            # Cancelling and rotating the token change the world: do them last.
            calls.sort(key=lambda c: c[1].endswith(("/cancel", "/token")))
            for method, url, query, body in calls:
                r = client.request(method.upper(), url, params=query, json=body, headers=headers)
                assert r.status_code < 500, (method, url, query, r.text)
                json_body = r.headers.get("content-type", "").startswith("application/json")
                text = json.dumps(r.json()) if json_body else r.text
                leaked = hidden & _numbers(text)
                assert not leaked, f"{viewer}: {method.upper()} {url} {query} shows {leaked}"
    finally:
        app_db.CLOCK_OFFSET[0] = timedelta(0)
