from app.admin.service import upsert_node
from tests.factories import join, make_competition, make_organizer


def test_fleet_and_queue_depth_for_admins_only(client, admin_headers, db):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0, 1, 2])
    student = join(client, comp["slug"])
    client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                headers=student)
    upsert_node(db, "gpu-node-1", "train.cpu", device_name="NVIDIA H200")
    db.commit()

    assert client.get("/api/admin/workers", headers=org).status_code == 403
    assert client.get("/api/admin/workers").status_code == 401
    body = client.get("/api/admin/workers", headers=admin_headers).json()
    assert body["workers"][0]["hostname"] == "gpu-node-1"
    assert body["workers"][0]["state"] == "idle"
    assert body["workers"][0]["device_name"] == "NVIDIA H200"
    q = {x["queue"]: x for x in body["queues"]}["train.cpu"]
    assert q["queued_runs"] == 3
    assert q["broker_messages"] == 3


def test_only_admins_create_users(client, admin_headers):
    org = make_organizer(client, admin_headers)
    r = client.post("/api/admin/users", json={"name": "x", "role": "admin"}, headers=org)
    assert r.status_code == 403
    r = client.post("/api/admin/users", json={"name": "x", "role": "wizard"}, headers=admin_headers)
    assert r.status_code == 422
