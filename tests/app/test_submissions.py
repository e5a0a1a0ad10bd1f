from datetime import timedelta

from app.db import utcnow
from tests.factories import join, make_competition, make_organizer


def _setup(client, admin_headers, **comp):
    org = make_organizer(client, admin_headers)
    c = make_competition(client, org, **comp)
    return c, join(client, c["slug"])


def _broker_messages(settings_env) -> int:
    return len(list((settings_env / "broker" / "queue").glob("*.msg")))


def test_submit_creates_one_queued_run_per_seed_and_enqueues_after_commit(client, admin_headers, settings_env):
    comp, student = _setup(client, admin_headers, seeds=[0, 7])
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"lr": 0.1, "batch_size": 64, "epochs": 2}}, headers=student)
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["status"] == "queued" and sub["config"]["lr"] == 0.1
    detail = client.get(f"/api/submissions/{sub['id']}", headers=student).json()
    assert sorted(run["seed"] for run in detail["runs"]) == [0, 7]
    assert {run["status"] for run in detail["runs"]} == {"queued"}
    assert _broker_messages(settings_env) == 2
    assert [s["id"] for s in client.get("/api/submissions", headers=student).json()] == [sub["id"]]


def test_unknown_field_is_rejected_and_nothing_is_stored(client, admin_headers, settings_env):
    comp, student = _setup(client, admin_headers)
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"lr": 0.1, "learning_rate": 0.1}}, headers=student)
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "config", "learning_rate"] and err["type"] == "extra_forbidden"
    assert client.get("/api/submissions", headers=student).json() == []
    assert _broker_messages(settings_env) == 0


def test_engine_bounds_name_field_value_and_range(client, admin_headers):
    comp, student = _setup(client, admin_headers)
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"label_smoothing": 0.9}}, headers=student)
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "config", "label_smoothing"]
    assert err["input"] == 0.9 and "0.5" in err["msg"]


def test_search_space_violations_name_field_value_and_allowed_range(client, admin_headers):
    comp, student = _setup(client, admin_headers)
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"lr": 3.0, "batch_size": 48, "epochs": 9, "stem": "deep"}}, headers=student)
    assert r.status_code == 422
    errors = {e["loc"][-1]: e for e in r.json()["detail"]}
    assert set(errors) == {"lr", "batch_size", "epochs", "stem"}
    assert errors["lr"]["input"] == 3.0 and errors["lr"]["ctx"]["allowed"] == {"min": 0.001, "max": 1.0}
    assert "lr=3.0" in errors["lr"]["msg"] and "[0.001, 1.0]" in errors["lr"]["msg"]
    assert errors["batch_size"]["ctx"]["allowed"] == {"choices": [32, 64, 100]}
    assert "budget" in errors["epochs"]["msg"]  # competition max_epochs=3
    assert errors["stem"]["ctx"]["allowed"] == {"choices": ["cifar"]}  # architecture options are opt-in


def test_quota_gives_429_with_retry_after(client, admin_headers):
    comp, student = _setup(client, admin_headers, submission_quota=2, quota_window_hours=1)
    url = f"/api/competitions/{comp['slug']}/submissions"
    for _ in range(2):
        assert client.post(url, json={"config": {"batch_size": 32}}, headers=student).status_code == 201
    r = client.post(url, json={"config": {"batch_size": 32}}, headers=student)
    assert r.status_code == 429
    assert 3500 <= int(r.headers["Retry-After"]) <= 3601
    assert "frees at" in r.json()["detail"]
    # Quotas are per team: another team still submits.
    other = join(client, comp["slug"], name="bob")
    assert client.post(url, json={"config": {"batch_size": 32}}, headers=other).status_code == 201


def test_quota_without_window_never_resets(client, admin_headers):
    comp, student = _setup(client, admin_headers, submission_quota=1)
    url = f"/api/competitions/{comp['slug']}/submissions"
    assert client.post(url, json={"config": {"batch_size": 32}}, headers=student).status_code == 201
    r = client.post(url, json={"config": {"batch_size": 32}}, headers=student)
    assert r.status_code == 429 and "does not reset" in r.json()["detail"]


def test_closed_competition_rejects_submissions(client, admin_headers):
    past = (utcnow() - timedelta(days=1)).isoformat()
    comp, student = _setup(client, admin_headers, deadline=past)
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                    headers=student)
    assert r.status_code == 409 and "closed" in r.json()["detail"]


def test_must_join_before_submitting(client, admin_headers):
    org = make_organizer(client, admin_headers)
    c1 = make_competition(client, org)
    c2 = make_competition(client, org)
    student = join(client, c1["slug"])
    r = client.post(f"/api/competitions/{c2['slug']}/submissions", json={"config": {}}, headers=student)
    assert r.status_code == 403


def test_cancel_queued_submission(client, admin_headers):
    comp, student = _setup(client, admin_headers, seeds=[0, 1])
    sub = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                      headers=student).json()
    r = client.post(f"/api/submissions/{sub['id']}/cancel", headers=student)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "cancelled"
    assert {run["status"] for run in body["runs"]} == {"cancelled"}
    assert body["error"] == "cancelled by participant"
    assert client.post(f"/api/submissions/{sub['id']}/cancel", headers=student).status_code == 409


def test_participants_see_only_their_team(client, admin_headers):
    comp, alice = _setup(client, admin_headers)
    sub = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                      headers=alice).json()
    mallory = join(client, comp["slug"], name="mallory")
    assert client.get(f"/api/submissions/{sub['id']}", headers=mallory).status_code == 404
    assert client.post(f"/api/submissions/{sub['id']}/cancel", headers=mallory).status_code == 404
    teammate = join(client, comp["slug"], name="carol", team="team-alice", invite_code=alice["X-Invite-Code"])
    assert client.get(f"/api/submissions/{sub['id']}", headers=teammate).status_code == 200
    assert client.get("/api/submissions/99999", headers=alice).status_code == 404


def test_openapi_publishes_the_hyperparameter_schema(client):
    spec = client.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["TrainConfig"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["label_smoothing"]["maximum"] == 0.5
    assert set(schema["properties"]["optimizer"]["enum"]) == {"sgd", "adam", "adamw"}


def test_absurd_submission_ids_are_a_422_not_a_crash(client, admin_headers):
    _, student = _setup(client, admin_headers)
    assert client.get("/api/submissions/100000000000000000000", headers=student).status_code == 422
    assert client.get("/api/submissions/0", headers=student).status_code == 422


def test_a_retry_with_the_same_idempotency_key_returns_the_first_submission(client, admin_headers):
    comp = make_competition(client, make_organizer(client, admin_headers), submission_quota=2)
    student = join(client, comp["slug"])
    url = f"/api/competitions/{comp['slug']}/submissions"
    body = {"config": {"batch_size": 32, "lr": 0.1}}
    first = client.post(url, json=body, headers={**student, "Idempotency-Key": "k-1"})
    again = client.post(url, json=body, headers={**student, "Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(client.get("/api/submissions", headers=student).json()) == 1  # one submission, one quota slot
    # The same key for another config is a client bug, not a retry: refused, naming the first submission.
    other = client.post(url, json={"config": {"batch_size": 64}}, headers={**student, "Idempotency-Key": "k-1"})
    assert other.status_code == 409 and str(first.json()["id"]) in other.json()["detail"]
    # A new key is a new submission; the quota still counts every one of them.
    assert client.post(url, json=body, headers={**student, "Idempotency-Key": "k-2"}).status_code == 201
    assert client.post(url, json=body, headers={**student, "Idempotency-Key": "k-3"}).status_code == 429
    assert client.post(url, json=body, headers={**student, "Idempotency-Key": "k 4"}).status_code == 422
