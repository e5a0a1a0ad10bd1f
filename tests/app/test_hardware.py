"""Hardware classes through the HTTP API: admins define them, organizers read them, competitions must
name one, and the board flags a result whose device was not its competition's class."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, update

from app.submissions.models import Run
from app.submissions.service import refresh_submission
from tests.factories import (
    CompetitionFactory,
    SubmissionFactory,
    TeamFactory,
    UserFactory,
    bind,
    competition_payload,
    make_organizer,
)

L4ISH = {"device_type": "cuda", "name_pattern": r"\bL4\b", "min_memory_gib": 20, "max_memory_gib": 24,
         "precision": "bf16", "train_images_per_sec": 4000, "eval_images_per_sec": 16000, "description": "an L4"}


def _name() -> str:
    return f"hw-{uuid.uuid4().hex[:8]}"  # the classes outlive a test (as the seeded ones do): never reuse one


def test_admin_defines_a_class_and_organizers_read_it(client, admin_headers):
    org = make_organizer(client, admin_headers)
    name = _name()
    r = client.put(f"/api/admin/hardware-classes/{name}", json=L4ISH, headers=admin_headers)
    assert r.status_code == 201, r.text
    assert r.json() | {"updated_at": None} == {**L4ISH, "name": name, "cpu_capability": None, "updated_at": None}

    listed = client.get("/api/admin/hardware-classes", headers=org)
    assert listed.status_code == 200
    by_name = {c["name"]: c for c in listed.json()}
    assert {"cpu", "cpu-avx2", "cpu-avx512", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h200", name} <= set(by_name)
    assert by_name["h100-80gb"]["device_type"] == "cuda" and by_name["h100-80gb"]["min_memory_gib"] == 75
    assert by_name["cpu-avx2"]["cpu_capability"] == "AVX2" and by_name[name]["name_pattern"] == r"\bL4\b"

    # PUT replaces the whole definition: what is left out goes back to its default.
    r = client.put(f"/api/admin/hardware-classes/{name}",
                   json={"device_type": "cpu", "cpu_capability": "AVX512", "train_images_per_sec": 40,
                         "eval_images_per_sec": 160}, headers=admin_headers)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["device_type"], got["cpu_capability"], got["name_pattern"], got["min_memory_gib"],
            got["precision"], got["description"]) == ("cpu", "AVX512", "", None, None, "")

    actions = [(e["action"], e["target"]) for e in client.get("/api/admin/audit", headers=admin_headers).json()]
    assert actions[:2] == [("hardware_class.replace", f"hardware_class:{name}"),
                           ("hardware_class.create", f"hardware_class:{name}")]
    assert client.put(f"/api/admin/hardware-classes/{name}", json=L4ISH, headers=org).status_code == 403


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"device_type": "tpu"}, "device_type", "'cpu' or 'cuda'"),
    ({"name_pattern": "H100("}, "name_pattern", "not a valid regular expression"),
    ({"min_memory_gib": 30, "max_memory_gib": 20}, None, "must not exceed max_memory_gib"),
    ({"min_memory_gib": -1}, "min_memory_gib", "greater than or equal to 0"),
    ({"precision": "fp8"}, "precision", "'bf16', 'fp16' or 'fp32'"),
    ({"train_images_per_sec": 0}, "train_images_per_sec", "greater than 0"),
    ({"eval_images_per_sec": -5}, "eval_images_per_sec", "greater than 0"),
    ({"cpu_capability": "AVX512"}, None, "cpu_capability applies to cpu classes only"),
    ({"device_type": "cpu", "min_memory_gib": None, "max_memory_gib": None, "precision": "fp16"}, None,
     "never resolves to fp16 on a CPU"),
    ({"device_type": "cpu", "precision": None}, None, "memory range applies to cuda classes only"),
    ({"colour": "green"}, "colour", "Extra inputs are not permitted"),
])
def test_a_bad_class_is_refused_with_a_422_that_says_why(client, admin_headers, change, field, words):
    name = _name()
    r = client.put(f"/api/admin/hardware-classes/{name}", json={**L4ISH, **change}, headers=admin_headers)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == (["body", field] if field else ["body"])
    assert words in err["msg"]
    names = [c["name"] for c in client.get("/api/admin/hardware-classes", headers=admin_headers).json()]
    assert name not in names


def test_a_class_name_must_be_a_queue_name(client, admin_headers):
    r = client.put("/api/admin/hardware-classes/H100 80GB", json=L4ISH, headers=admin_headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"]


def test_a_competition_must_name_a_defined_class(client, admin_headers):
    org = make_organizer(client, admin_headers)
    name = _name()
    r = client.post("/api/competitions", json=competition_payload(hardware_class=name), headers=org)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "hardware_class"] and err["input"] == name
    assert f"no hardware class {name!r}" in err["msg"] and "h100-80gb" in err["msg"]
    assert {"cpu", "l4", "h100-80gb"} <= set(err["ctx"]["allowed"])
    assert client.get("/api/competitions", headers=org).json() == []  # nothing was created

    assert client.put(f"/api/admin/hardware-classes/{name}", json=L4ISH, headers=admin_headers).status_code == 201
    r = client.post("/api/competitions", json=competition_payload(hardware_class=name), headers=org)
    assert r.status_code == 201, r.text


def test_the_board_flags_a_result_from_the_wrong_device_and_names_its_unit(client, db):
    bind(db)
    comp = CompetitionFactory(hardware_class="cpu")
    honest, flagged = TeamFactory(competition=comp), TeamFactory(competition=comp)
    user = UserFactory()
    SubmissionFactory(competition_id=comp.id, team_id=honest.id, user_id=user.id, accuracy=0.5, gpu_seconds=10.0)
    bad = SubmissionFactory(competition_id=comp.id, team_id=flagged.id, user_id=user.id, accuracy=0.9,
                            gpu_seconds=10.0)
    # What a worker writes when the run's device was not the class (worker.tasks.result_columns).
    db.execute(update(Run).where(Run.submission_id == bad.id).values(
        device_mismatch="NVIDIA L4 is not hardware class 'cpu': it is a cuda device, not cpu"))
    refresh_submission(db, bad.id)
    db.commit()
    assert db.scalar(select(Run.device_mismatch).where(Run.submission_id == bad.id)).startswith("NVIDIA L4")

    board = client.get(f"/api/competitions/{comp.slug}/leaderboard").json()
    assert (board["hardware_class"], board["cost_unit"]) == ("cpu", "cpu-hours")
    assert [(e["team"], e["device_mismatch"]) for e in board["entries"]] == [(flagged.name, True),
                                                                             (honest.name, False)]
    gpu = CompetitionFactory(hardware_class="h100-80gb")
    board = client.get(f"/api/competitions/{gpu.slug}/leaderboard").json()
    assert (board["cost_unit"], board["entries"]) == ("gpu-hours", [])
