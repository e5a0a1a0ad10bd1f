"""A contest's rules (freeze, final entries, config reveal, board view), changed by its organizer; and the
organizer's baseline entries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from app.db import session_scope, utcnow
from app.submissions.models import Submission
from tests.factories import competition_payload, join, make_competition, make_organizer


def _at(hours: float) -> str:
    return (utcnow() + timedelta(hours=hours)).isoformat()


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _field_error(r, field: str) -> str:
    """Assert a 422 located at body.<field>; its message."""
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"][:2] == ["body", field]]
    assert errors, r.text
    return errors[0]["msg"]


# ---- rules at creation -------------------------------------------------------------------------------


def test_rules_have_defaults_and_are_kept(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    assert (comp["freeze_at"], comp["final_entries"], comp["reveal_configs"], comp["board_view"]) == \
        (None, 2, False, "accuracy")
    comp = make_competition(client, org, starts_at=_at(-1), freeze_at=_at(5), deadline=_at(6), final_entries=5,
                            reveal_configs=True, board_view="efficiency")
    got = client.get(f"/api/competitions/{comp['slug']}").json()
    assert (got["final_entries"], got["reveal_configs"], got["board_view"]) == (5, True, "efficiency")
    assert _when(got["freeze_at"]) < _when(got["deadline"])


def test_bad_rules_at_creation_name_the_field(client, admin_headers):
    org = make_organizer(client, admin_headers)

    def post(**rules):
        return client.post("/api/competitions", json=competition_payload(**rules), headers=org)

    assert "before the deadline" in post(freeze_at=_at(7), deadline=_at(6)).text
    assert post(freeze_at=_at(7), deadline=_at(6)).status_code == 422
    r = post(starts_at=_at(2), freeze_at=_at(1))
    assert r.status_code == 422 and "freeze_at must be after starts_at" in r.text
    for bad in (0, 21, "two"):
        _field_error(post(final_entries=bad), "final_entries")
    _field_error(post(board_view="speed"), "board_view")
    _field_error(post(freeze_at="2030-01-01T00:00:00"), "freeze_at")  # no offset


# ---- PATCH /api/competitions/{slug} --------------------------------------------------------------------


def test_the_organizer_changes_the_rules(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, deadline=_at(10), submission_quota=5)
    url = f"/api/competitions/{comp['slug']}"
    r = client.patch(url, json={"title": "  Spring  cup ", "freeze_at": _at(9), "final_entries": 3,
                                "reveal_configs": True, "board_view": "efficiency", "quota_window_hours": 24},
                     headers=org)
    assert r.status_code == 200, r.text
    got = client.get(url).json()
    assert got == r.json()
    assert (got["title"], got["final_entries"], got["reveal_configs"], got["board_view"],
            got["quota_window_hours"], got["submission_quota"]) == ("Spring cup", 3, True, "efficiency", 24, 5)
    assert abs(_when(got["deadline"]) - _when(got["freeze_at"]) - timedelta(hours=1)) < timedelta(seconds=5)
    # Only what is sent changes; an explicit null clears a field that may be empty.
    r = client.patch(url, json={"freeze_at": None, "submission_quota": None}, headers=org)
    assert r.status_code == 200, r.text
    assert (r.json()["freeze_at"], r.json()["submission_quota"], r.json()["final_entries"]) == (None, None, 3)
    event = client.get("/api/admin/audit", headers=admin_headers).json()[0]
    assert (event["action"], event["target"], event["detail"]) == \
        ("competition.rules", f"competition:{comp['slug']}", {"freeze_at": None, "submission_quota": None})


def test_only_its_organizer_or_an_admin_changes_the_rules(client, admin_headers):
    org = make_organizer(client, admin_headers, name="prof")
    other = make_organizer(client, admin_headers, name="rival")
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    url = f"/api/competitions/{comp['slug']}"
    body = {"final_entries": 4}
    assert client.patch(url, json=body).status_code == 401
    assert client.patch(url, json=body, headers=student).status_code == 403
    r = client.patch(url, json=body, headers=other)
    assert r.status_code == 403 and comp["slug"] in r.json()["detail"]
    assert client.get(url).json()["final_entries"] == 2
    assert client.patch(url, json=body, headers=admin_headers).status_code == 200
    assert client.patch(url, json={"final_entries": 5}, headers=org).json()["final_entries"] == 5
    assert client.patch("/api/competitions/nope", json=body, headers=org).status_code == 404


def test_bad_rule_changes_name_the_field(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, starts_at=_at(-1), deadline=_at(10))
    url = f"/api/competitions/{comp['slug']}"

    def patch(**body):
        return client.patch(url, json=body, headers=org)

    # Checked against the stored times: starts_at < freeze_at < deadline.
    assert "before the deadline" in _field_error(patch(freeze_at=_at(11)), "freeze_at")
    assert "after starts_at" in _field_error(patch(freeze_at=_at(-2)), "freeze_at")
    assert "after starts_at" in _field_error(patch(deadline=_at(-2)), "deadline")
    assert patch(freeze_at=_at(8)).status_code == 200
    assert "before the deadline" in _field_error(patch(deadline=_at(7)), "deadline")  # before the stored freeze
    assert patch(deadline=_at(7), freeze_at=_at(6)).status_code == 200  # both at once: in order together
    # Fields the request may not set, or not set that way.
    _field_error(patch(starts_at=_at(0)), "starts_at")
    _field_error(patch(seeds=[1, 2]), "seeds")
    for field, bad in (("title", None), ("final_entries", None), ("final_entries", 21), ("board_view", "speed"),
                       ("reveal_configs", None), ("submission_quota", 0), ("deadline", "tomorrow")):
        _field_error(patch(**{field: bad}), field)
    got = client.get(url).json()
    assert (got["final_entries"], got["board_view"], got["title"]) == (2, "accuracy", comp["title"])


# ---- baselines --------------------------------------------------------------------------------------------


def _baseline(client, comp, headers, expect=201, **config):
    r = client.post(f"/api/competitions/{comp['slug']}/baselines", json={"config": config or {"batch_size": 32}},
                    headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


def test_the_organizer_submits_a_baseline(client, admin_headers):
    org = make_organizer(client, admin_headers, name="prof")
    # Before it opens, with a quota of one and a tiny GPU-hour budget: none of them applies to a baseline.
    comp = make_competition(client, org, starts_at=_at(1), submission_quota=1, gpu_hour_budget=1e-6)
    first = _baseline(client, comp, org, lr=0.1, batch_size=32)
    second = _baseline(client, comp, admin_headers, lr=0.2, batch_size=32)
    assert first["user_id"] == client.get("/api/me", headers=org).json()["id"]
    assert first["team_id"] == second["team_id"]
    assert first["status"] == "queued" and first["predicted_seconds"] > 0
    with session_scope() as s:
        flags = s.execute(select(Submission.id, Submission.is_baseline)
                          .where(Submission.id.in_([first["id"], second["id"]]))).all()
    assert sorted(flags) == [(first["id"], True), (second["id"], True)]
    # Checked against the search space like any submission.
    bad = _baseline(client, comp, org, expect=422, lr=5.0, batch_size=32)
    assert bad["detail"][0]["loc"] == ["body", "config", "lr"]
    event = client.get("/api/admin/audit", headers=admin_headers).json()[0]
    assert (event["action"], event["detail"]) == ("baseline.submit", {"submission_id": second["id"]})


def test_only_its_organizer_or_an_admin_submits_a_baseline(client, admin_headers):
    org = make_organizer(client, admin_headers, name="prof")
    other = make_organizer(client, admin_headers, name="rival")
    comp = make_competition(client, org)
    student = join(client, comp["slug"])
    _baseline(client, comp, {}, expect=401)
    _baseline(client, comp, student, expect=403)
    _baseline(client, comp, other, expect=403)
    # The organizer is in no team: a baseline is not a submission of the caller's.
    assert client.get("/api/submissions", headers=org).json() == []


def test_no_participant_reaches_the_baseline_team(client, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    baseline_team = _baseline(client, comp, org)["team_id"]
    url = f"/api/competitions/{comp['slug']}/join"
    r = client.post(url, json={"name": "ann", "team": "Baseline"})
    assert r.status_code == 201 and r.json()["team_id"] != baseline_team
    r_ann = r.json()
    r = client.post(url, json={"name": "bo", "team": "BASELINE"})  # the participants' own "Baseline" team
    assert r.status_code == 403
    r = client.post(url, json={"name": "cy", "team": "\x01baseline"})
    assert r.status_code == 422 and "control" in r.text
    # The participants' "Baseline" team submits as any team does: its entries are its own, not baselines.
    ann = {"Authorization": f"Bearer {r_ann['token']}"}
    sub = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 64}},
                      headers=ann).json()
    assert sub["team_id"] == r_ann["team_id"] != baseline_team
    with session_scope() as s:
        assert s.scalar(select(Submission.is_baseline).where(Submission.id == sub["id"])) is False
