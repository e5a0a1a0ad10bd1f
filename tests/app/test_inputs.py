"""Anything a client can send gets a clear 4xx: non-finite numbers, oversized bodies, invisible names.

And what comes back is honest JSON: every datetime carries its UTC offset, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.factories import competition_payload, join, make_competition, make_organizer

NON_FINITE = ["NaN", "Infinity", "-Infinity"]


def _raw(client, path: str, body: str, headers: dict | None = None):
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("token", NON_FINITE)
def test_non_finite_hyperparameter_is_a_422_naming_the_field(client, admin_headers, token):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    path = f"/api/competitions/{comp['slug']}/submissions"
    for field in ("lr", "grad_clip_norm", "ema_decay"):  # bounded, optional and nullable floats
        r = _raw(client, path, f'{{"config": {{"{field}": {token}}}}}', student)
        assert r.status_code == 422, r.text
        err = r.json()["detail"][0]
        assert err["loc"] == ["body", "config", field]
        assert err["input"] == token  # echoed in strict JSON, spelled as the client sent it
        assert "finite" in err["msg"]
    assert client.get("/api/submissions", headers=student).json() == []  # nothing stored


@pytest.mark.parametrize("where", ["search_space", "quota_window_hours", "budget", "dataset"])
def test_non_finite_anywhere_in_a_competition_is_a_422(client, admin_headers, where):
    org = make_organizer(client, admin_headers)
    body = json.dumps(competition_payload())
    patched = {
        "search_space": ('"min": 0.001', '"min": NaN'),
        "quota_window_hours": ('"seeds": [0]', '"seeds": [0], "quota_window_hours": Infinity'),
        "budget": ('"max_epochs": 3', '"max_epochs": 3, "max_seconds": Infinity'),
        "dataset": ('"image_size": 32', '"image_size": NaN'),
    }[where]
    assert patched[0] in body
    r = _raw(client, "/api/competitions", body.replace(*patched), org)
    assert r.status_code == 422, r.text
    assert where in r.json()["detail"][0]["loc"]
    assert client.get("/api/competitions").json() == []


def test_oversized_body_is_a_413_before_parsing(client, admin_headers, settings_env):
    from app.config import get_settings

    limit = get_settings().max_body_bytes
    org = make_organizer(client, admin_headers)
    padded = json.dumps({**competition_payload(), "title": "x" * (limit + 1)})
    r = _raw(client, "/api/competitions", padded, org)
    assert r.status_code == 413 and str(limit) in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"title": "'
        for _ in range(limit // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = client.post("/api/competitions", content=chunks(), headers={**org, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/api/competitions").json() == []
    ok = competition_payload()
    assert len(json.dumps(ok)) < limit and client.post("/api/competitions", json=ok, headers=org).status_code == 201


@pytest.mark.parametrize("name", ["\u202e\u200b", "a\u200bb", "bell\x07", "\u2028", "   ", "team\u202eevil"])
def test_invisible_names_are_refused(client, admin_headers, name):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    r = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": "ok", "team": name})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "team"]
    r = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": name, "team": "fine"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = client.post("/api/admin/users", json={"name": name}, headers=admin_headers)
    assert r.status_code == 422


def test_names_are_normalised_and_team_names_unique_ignoring_case_and_width(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, title="  Ｆall   contest ")
    assert comp["title"] == "Fall contest"
    r = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": " Ann ", "team": "  Night  Owls "})
    assert r.status_code == 201 and r.json()["team"] == "Night Owls"
    code = r.json()["invite_code"]
    for twin in ("night owls", "ＮＩＧＨＴ ＯＷＬＳ", "NIGHT  OWLS"):
        r = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": "Bob", "team": twin})
        assert r.status_code == 403 and "Night Owls" in r.json()["detail"], r.text
    r = client.post(f"/api/competitions/{comp['slug']}/join",
                    json={"name": "Bob", "team": "night owls", "invite_code": code})
    assert r.status_code == 201 and r.json()["team"] == "Night Owls"


def test_deadline_before_start_is_a_422_on_the_field(client, admin_headers):
    org = make_organizer(client, admin_headers)
    r = client.post("/api/competitions", headers=org, json=competition_payload(
        starts_at="2026-12-02T00:00:00Z", deadline="2026-12-01T00:00:00Z"))
    assert r.status_code == 422
    assert "deadline must be after starts_at" in r.json()["detail"][0]["msg"]


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def test_every_datetime_in_a_response_carries_its_offset(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, deadline="2099-01-01T12:00:00+02:00")
    student = join(client, comp["slug"])
    sid = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"lr": 0.1, "batch_size": 32}},
                      headers=student).json()["id"]
    bodies = [client.get(f"/api/competitions/{comp['slug']}").json(), client.get("/api/competitions").json(),
              client.get(f"/api/submissions/{sid}", headers=student).json(),
              client.get("/api/submissions", headers=student).json()]
    stamps = []

    def walk(v, key=""):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif key.endswith("_at") or key == "deadline":
            if v is not None:
                stamps.append(v)

    walk(bodies)
    assert len(stamps) >= 6
    assert all(RFC3339.match(s) for s in stamps), stamps
    assert bodies[0]["deadline"].startswith("2099-01-01T10:00:00")  # stored and shown in UTC


@pytest.mark.slow  # a uvicorn process
def test_a_non_finite_body_leaves_the_connection_usable(tmp_path):
    """Against a real uvicorn: the 422 for a raw NaN is encoded, and the same keep-alive connection
    serves the next request (before, the 500 reset it)."""
    import os
    import sys

    import httpx

    from app import migrate
    from tests.e2e.services import free_port
    from worker.processes import spawn, stop, wait_http

    db = f"sqlite:///{tmp_path / 'api.db'}"
    migrate.upgrade(db)
    port = free_port()
    env = {**os.environ, "HPARENA_DATABASE_URL": db, "HPARENA_VAR_DIR": str(tmp_path), "HPARENA_ADMIN_TOKEN": "t"}
    proc = spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)], tmp_path / "api.log", env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            r = http.post("/api/competitions/x/submissions", content=b'{"config": {"lr": NaN}}',
                          headers={"Content-Type": "application/json", "Authorization": "Bearer t"})
            assert r.status_code in (404, 422), r.text  # the competition does not exist; never 500
            r = http.post("/api/admin/users", content=b'{"name": NaN}',
                          headers={"Content-Type": "application/json", "Authorization": "Bearer t"})
            assert r.status_code == 422 and r.json()["detail"][0]["input"] == "NaN"
            assert http.get("/api/health").status_code == 200
        assert "Traceback" not in (tmp_path / "api.log").read_text()
    finally:
        stop(proc)


def test_nul_bytes_anywhere_are_a_4xx_not_a_database_error(client, admin_headers):
    """PostgreSQL refuses a NUL character in any string; it must never reach a query."""
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    for path in ("/api/competitions/a%00b", "/api/competitions/a%00b/leaderboard",
                 "/api/submissions?competition=a%00b"):
        assert client.get(path, headers=student).status_code == 404, path
    assert client.post("/api/competitions/a%00b/join", json={"name": "x", "team": "y"}).status_code == 404
    bad_path = competition_payload(dataset={"name": "cifar10", "path": "/data/a\x00b"})
    r = client.post("/api/competitions", json=bad_path, headers=org)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dataset", "path"]
    r = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": "x\x00", "team": "y"})
    assert r.status_code == 422
    assert client.get("/api/submissions/1", headers={"Authorization": "Bearer a\x00b"}).status_code == 401


def test_an_unknown_query_parameter_is_named_not_ignored(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    # A typo'd filter would otherwise list every competition's submissions as if no filter were asked for.
    r = client.get("/api/submissions", params={"competiton": comp["slug"]}, headers=student)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "competiton"] and "competition" in r.json()["detail"][0]["msg"]
    assert client.get("/api/submissions", params={"competition": comp["slug"]}, headers=student).status_code == 200
