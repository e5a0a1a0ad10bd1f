from tests.factories import competition_payload, join, make_competition, make_organizer


def test_organizer_creates_competition_and_anyone_reads_it(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0, 1, 2])
    assert comp["seeds"] == [0, 1, 2]
    assert comp["model"]["width"] == 8
    r = client.get(f"/api/competitions/{comp['slug']}")
    assert r.status_code == 200 and r.json()["title"] == comp["title"]
    assert comp["slug"] in [c["slug"] for c in client.get("/api/competitions").json()]


def test_only_organizers_create_competitions(client, admin_headers):
    assert client.post("/api/competitions", json=competition_payload()).status_code == 401
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    r = client.post("/api/competitions", json=competition_payload(), headers=student)
    assert r.status_code == 403
    bad = {"Authorization": "Bearer not-a-token"}
    assert client.post("/api/competitions", json=competition_payload(), headers=bad).status_code == 401


def test_duplicate_slug_conflicts(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    r = client.post("/api/competitions", json=competition_payload(slug=comp["slug"]), headers=org)
    assert r.status_code == 409


def test_bad_competition_definitions_name_the_field(client, admin_headers):
    org = make_organizer(client, admin_headers)
    r = client.post("/api/competitions", json=competition_payload(search_space={"learning_rate": {"max": 1}}),
                    headers=org)
    assert r.status_code == 422 and "learning_rate" in r.text
    r = client.post("/api/competitions", json=competition_payload(seeds=[1, 1]), headers=org)
    assert r.status_code == 422 and "seeds" in r.text
    r = client.post("/api/competitions", json=competition_payload(model={"width": 2}), headers=org)
    assert r.status_code == 422 and "width" in r.text
    r = client.post("/api/competitions", json={**competition_payload(), "colour": "red"}, headers=org)
    assert r.status_code == 422 and "colour" in r.text


def test_join_gives_token_and_teammates_share_a_team(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    url = f"/api/competitions/{comp['slug']}/join"
    r1 = client.post(url, json={"name": "ann", "team": "owls"})
    assert r1.status_code == 201
    code = r1.json()["invite_code"]
    # Team names are public on the leaderboard: the name alone doesn't get anyone in.
    r = client.post(url, json={"name": "eve", "team": "owls"})
    assert r.status_code == 403 and "invite_code" in r.json()["detail"]
    assert client.post(url, json={"name": "eve", "team": "owls", "invite_code": "guess"}).status_code == 403
    r2 = client.post(url, json={"name": "bob", "team": "owls", "invite_code": code})
    assert r2.status_code == 201
    assert r1.json()["team_id"] == r2.json()["team_id"]
    assert r1.json()["token"] != r2.json()["token"]
    # An existing participant joins with their token; joining twice conflicts.
    headers = {"Authorization": f"Bearer {r1.json()['token']}"}
    again = client.post(f"/api/competitions/{comp['slug']}/join", json={"name": "ann", "team": "owls"},
                        headers=headers)
    assert again.status_code == 409
    assert client.post("/api/competitions/nope/join", json={"name": "x", "team": "y"}).status_code == 404
    # A wrong token is refused, not silently turned into a new participant.
    r = client.post(url, json={"name": "x", "team": "z"}, headers={"Authorization": "Bearer typo"})
    assert r.status_code == 401


def test_dates_need_an_offset_and_are_kept_in_utc(client, admin_headers):
    org = make_organizer(client, admin_headers)
    r = client.post("/api/competitions", json=competition_payload(deadline="2030-01-01T12:00:00"), headers=org)
    assert r.status_code == 422 and "deadline" in r.text
    comp = make_competition(client, org, deadline="2030-01-01T12:00:00+02:00")
    assert comp["deadline"].startswith("2030-01-01T10:00:00")


def test_search_space_rules_are_checked_when_the_competition_is_made(client, admin_headers):
    org = make_organizer(client, admin_headers)
    for space, word in [({"compile": {"max": 0}}, "not numeric"), ({"lr": {"min": 1, "max": 0.1}}, "min"),
                        ({"optimizer": {"choices": ["lion"]}}, "optimizer")]:
        r = client.post("/api/competitions", json=competition_payload(search_space=space), headers=org)
        assert r.status_code == 422 and word in r.text, (space, r.text)
    r = client.post("/api/competitions", json=competition_payload(seeds=[2**31]), headers=org)
    assert r.status_code == 422 and "seeds" in r.text


def test_rotating_the_admin_token_revokes_the_old_one(client, admin_headers, monkeypatch):
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.main import create_app

    assert client.get("/api/admin/workers", headers=admin_headers).status_code == 200
    monkeypatch.setenv("HPARENA_ADMIN_TOKEN", "rotated-admin-token")
    get_settings.cache_clear()
    with TestClient(create_app()) as restarted:
        assert restarted.get("/api/admin/workers", headers=admin_headers).status_code == 401
        new = {"Authorization": "Bearer rotated-admin-token"}
        assert restarted.get("/api/admin/workers", headers=new).status_code == 200
