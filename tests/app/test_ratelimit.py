"""Rate limits on submitting and joining, per token and per address (app.ratelimit)."""

from __future__ import annotations

from tests.conftest import reset_caches
from tests.factories import join, make_competition, make_organizer


def _limits(monkeypatch, per_token: int, per_address: int) -> None:
    monkeypatch.setenv("HPARENA_RATE_LIMIT_PER_TOKEN", str(per_token))
    monkeypatch.setenv("HPARENA_RATE_LIMIT_PER_ADDRESS", str(per_address))
    # Windows are fixed: an hour-long one makes it unlikely that a slow run of these requests on busy cores
    # straddles a window's end (which starts the count afresh).
    monkeypatch.setenv("HPARENA_RATE_LIMIT_WINDOW_SECONDS", "3600")
    reset_caches()


def test_submissions_over_the_per_token_limit_get_429_with_retry_after(client, admin_headers, monkeypatch):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    ann, bob = join(client, comp["slug"], "ann"), join(client, comp["slug"], "bob")
    _limits(monkeypatch, per_token=3, per_address=100)
    url = f"/api/competitions/{comp['slug']}/submissions"
    codes = [client.post(url, json={"config": {"batch_size": 32}}, headers=ann).status_code for _ in range(4)]
    assert codes == [201, 201, 201, 429]
    r = client.post(url, json={"config": {"batch_size": 32}}, headers=ann)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 3600
    assert "at most 3 requests per 3600 s per token" in r.json()["detail"]
    assert len(client.get("/api/submissions", headers=ann).json()) == 3  # nothing stored for a refused one
    assert client.post(url, json={"config": {"batch_size": 32}}, headers=bob).status_code == 201  # bob has his own


def test_joins_over_the_per_address_limit_get_429(client, admin_headers, monkeypatch):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    _limits(monkeypatch, per_token=100, per_address=2)
    url = f"/api/competitions/{comp['slug']}/join"
    codes = [client.post(url, json={"name": f"p{i}", "team": f"t{i}"}).status_code for i in range(3)]
    assert codes == [201, 201, 429]
    r = client.post(url, json={"name": "p9", "team": "t9"})
    assert "per address" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1


def test_limits_can_be_turned_off(client, admin_headers, monkeypatch):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    monkeypatch.setenv("HPARENA_RATE_LIMIT_ENABLED", "false")
    _limits(monkeypatch, per_token=1, per_address=1)
    url = f"/api/competitions/{comp['slug']}/join"
    assert {client.post(url, json={"name": f"p{i}", "team": f"t{i}"}).status_code for i in range(3)} == {201}
