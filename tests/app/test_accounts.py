"""Tokens: rotated and revoked by their owner and by admins; admin and organizer actions in the audit log."""

from tests.factories import join, make_competition, make_organizer


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_owner_rotates_then_revokes_their_token_and_keeps_their_work(client, admin_headers):
    comp = make_competition(client, make_organizer(client, admin_headers))
    student = join(client, comp["slug"], name="ada")
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                    headers=student)
    assert r.status_code == 201
    sub_id = r.json()["id"]
    me = client.get("/api/me", headers=student).json()
    assert (me["name"], me["role"]) == ("ada", "participant")

    r = client.post("/api/me/token", headers=student)
    assert r.status_code == 200
    new = _bearer(r.json()["token"])
    assert client.get("/api/me", headers=student).status_code == 401  # the old token stopped at once
    assert client.get("/api/me", headers=new).json()["id"] == me["id"]
    assert [s["id"] for s in client.get("/api/submissions", headers=new).json()] == [sub_id]

    assert client.delete("/api/me/token", headers=new).status_code == 204
    assert client.get("/api/me", headers=new).status_code == 401

    # An admin restores the account with a new token: the submission and the team seat are still there.
    r = client.post(f"/api/admin/users/{me['id']}/token", headers=admin_headers)
    assert r.status_code == 200
    restored = _bearer(r.json()["token"])
    assert [s["id"] for s in client.get("/api/submissions", headers=restored).json()] == [sub_id]
    assert client.post(f"/api/competitions/{comp['slug']}/join", json={"name": "ada", "team": "other"},
                       headers=restored).status_code == 409  # already in a team of this competition


def test_admin_revokes_any_token_and_only_admins_can(client, admin_headers):
    org = make_organizer(client, admin_headers)
    org_id = client.get("/api/me", headers=org).json()["id"]
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    student_id = client.get("/api/me", headers=student).json()["id"]

    assert client.delete(f"/api/admin/users/{student_id}/token", headers=org).status_code == 403
    assert client.delete(f"/api/admin/users/{student_id}/token", headers=student).status_code == 403
    assert client.delete("/api/admin/users/999999/token", headers=admin_headers).status_code == 404
    assert client.delete(f"/api/admin/users/{org_id}/token", headers=admin_headers).status_code == 204
    assert client.get("/api/me", headers=org).status_code == 401
    assert client.post("/api/competitions", json={"slug": "x-1", "title": "X"}, headers=org).status_code == 401


def test_audit_log_records_admin_and_organizer_actions_for_admins_only(client, admin_headers):
    org = make_organizer(client, admin_headers, name="prof")
    comp = make_competition(client, org)
    student = join(client, comp["slug"], name="bo")
    student_id = client.get("/api/me", headers=student).json()["id"]
    student = _bearer(client.post(f"/api/admin/users/{student_id}/token", headers=admin_headers).json()["token"])
    client.delete("/api/me/token", headers=org)

    assert client.get("/api/admin/audit", headers=student).status_code == 403
    assert client.get("/api/admin/audit").status_code == 401
    events = client.get("/api/admin/audit", headers=admin_headers).json()
    got = [(e["actor_name"], e["action"], e["target"]) for e in events]
    assert got == [
        ("prof", "token.revoke", got[0][2]),
        ("bootstrap-admin", "token.rotate", f"user:{student_id}"),
        ("prof", "competition.create", f"competition:{comp['slug']}"),
        ("bootstrap-admin", "user.create", got[3][2]),
    ]
    assert events[3]["detail"] == {"name": "prof", "role": "organizer"}
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
    # Paging back from the second event returns the two before it.
    older = client.get("/api/admin/audit", params={"before_id": events[1]["id"]}, headers=admin_headers).json()
    assert [e["id"] for e in older] == [e["id"] for e in events[2:]]
    assert client.get("/api/admin/audit", params={"limit": 0}, headers=admin_headers).status_code == 422
