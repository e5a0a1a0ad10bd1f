"""The boards through the HTTP API: scores over seeds, rank bands on planted per-image outcomes, the Pareto
front, the cache, and the public / frozen / private phases crossed with a clock the tests move."""

from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest

from app.db import utcnow
from app.leaderboard.board import from_csv
from tests.factories import join, land, make_competition, make_organizer

pytestmark = pytest.mark.slow

N = 2000  # test images: the public and private halves get 1,000 each
LABELS = [i % 10 for i in range(N)]


_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+(?:[+-]\d\d:\d\d|Z)?")


def _outcomes(rate: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < rate for _ in range(N)]


def _flip(correct: list[bool], *indices: int) -> list[bool]:
    out = list(correct)
    for i in indices:
        out[i] = not out[i]
    return out


def _result(correct: list[bool], **fields) -> dict:
    """finish()'s fields for one run: public and private accuracies are what the planted outcomes give."""
    from worker.engine.split import public_private_indices

    public, private = public_private_indices(N)
    return {"correct": correct, "labels": LABELS, "accuracy": sum(correct[i] for i in public) / len(public),
            "private_accuracy": sum(correct[i] for i in private) / len(private), **fields}


def _contest(client, admin_headers, teams, **overrides):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, **overrides)
    return comp, org, {t: join(client, comp["slug"], name=f"{t}-user", team=t) for t in teams}


def _get(client, comp, headers=None, **params):
    r = client.get(f"/api/competitions/{comp['slug']}/leaderboard", params=params, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _by_team(board):
    return {e["team"]: e for e in board["entries"]}


def test_an_entry_shows_mean_std_and_each_seeds_score_with_ece(client, db, admin_headers):
    comp, _, h = _contest(client, admin_headers, ["a", "b"], seeds=[0, 1, 2])
    base = _outcomes(0.8, 1)
    land(client, comp, h["a"], [_result(_flip(base, *range(k * 40)), ece=0.01 * (k + 1)) for k in range(3)])
    land(client, comp, h["b"], _result(_outcomes(0.5, 2), ece=0.2))
    board = _get(client, comp)
    a = _by_team(board)["a"]
    seeds = [s["accuracy"] for s in a["seed_scores"]]
    assert [s["seed"] for s in a["seed_scores"]] == [0, 1, 2]
    assert len(set(seeds)) == 3
    mean = sum(seeds) / 3
    std = (sum((x - mean) ** 2 for x in seeds) / 2) ** 0.5
    assert a["accuracy"] == pytest.approx(mean) and a["accuracy_std"] == pytest.approx(std)
    assert a["ece"] == pytest.approx(0.02)
    assert _by_team(board)["b"]["accuracy_std"] == 0.0  # three identical seeds
    assert board["bands"] == {"test": board["bands"]["test"], "alpha": 0.05, "resamples": 1000, "seed": 0,
                              "available": True}
    assert all(e["private_accuracy"] is None and e["private_seed_scores"] is None for e in board["entries"])


def test_rank_bands_on_planted_outcomes(client, db, admin_headers):
    """Near-identical entries share a band; clearly different ones do not; the order inside a band is
    marked as a tie-break."""
    comp, _, h = _contest(client, admin_headers, ["top", "twin", "mid", "low"])
    from worker.engine.split import public_private_indices

    top = _outcomes(0.9, 3)
    misses = [i for i in public_private_indices(N)[0] if top[i]][:2]  # twin gets 2 public images wrong
    land(client, comp, h["top"], _result(top, gpu_seconds=400.0))
    land(client, comp, h["twin"], _result(_flip(top, *misses), gpu_seconds=100.0))
    land(client, comp, h["mid"], _result(_outcomes(0.75, 4), gpu_seconds=50.0))
    land(client, comp, h["low"], _result(_outcomes(0.5, 5), gpu_seconds=60.0))
    board = _get(client, comp)
    e = _by_team(board)
    assert e["top"]["rank"] == e["twin"]["rank"] == 1 and e["top"]["tie"] and e["twin"]["tie"]
    assert (e["mid"]["rank"], e["mid"]["tie"]) == (3, False)
    assert (e["low"]["rank"], e["low"]["tie"]) == (4, False)
    assert [x["position"] for x in board["entries"]] == [1, 2, 3, 4]
    # The Pareto front of accuracy against GPU-hours: low is beaten by mid (better and cheaper); twin is
    # cheaper than top but not better, so both stay.
    assert {t for t, x in e.items() if x["pareto"]} == {"top", "twin", "mid"}
    eff = _get(client, comp, view="efficiency")
    assert eff["view"] == "efficiency"
    hours = [x["gpu_hours"] for x in eff["entries"]]
    assert hours == sorted(hours) and all(x["pareto"] for x in eff["entries"])


def test_the_cache_serves_until_a_result_lands(client, db, admin_headers):
    comp, _, h = _contest(client, admin_headers, ["a", "b"])
    land(client, comp, h["a"], _result(_outcomes(0.7, 6)))
    first = _get(client, comp)
    assert _get(client, comp)["computed_at"] == first["computed_at"]  # served, not recomputed
    land(client, comp, h["b"], _result(_outcomes(0.8, 7)))
    second = _get(client, comp)
    assert second["computed_at"] > first["computed_at"] and not second["stale"]
    assert [x["team"] for x in second["entries"]] == ["b", "a"]


def test_phases_open_frozen_closed(client, db, admin_headers, clock):
    now = utcnow()
    comp, org, h = _contest(client, admin_headers, ["a", "b"], freeze_at=(now + timedelta(hours=1)).isoformat(),
                            deadline=(now + timedelta(hours=2)).isoformat(), reveal_configs=True)
    a1 = land(client, comp, h["a"], _result(_outcomes(0.6, 8)))
    land(client, comp, h["b"], _result(_outcomes(0.7, 9)))
    slug = comp["slug"]

    # Open: everyone sees the live public board; nobody but the organizer reads the private one.
    assert _get(client, comp)["phase"] == "open"
    for who in ({}, h["a"]):
        r = client.get(f"/api/competitions/{slug}/leaderboard", params={"board": "private"}, headers=who)
        # No score leaks into the refusal (the deadline's timestamp may hold "0." in its seconds).
        assert r.status_code == 403 and "0." not in _ISO_TIME.sub("", r.json()["detail"])
    assert client.get(f"/api/competitions/{slug}/leaderboard", params={"board": "private"},
                      headers=org).status_code == 200

    # Frozen: a's better entry after the freeze shows to a alone, as its live (unranked) row.
    clock(timedelta(hours=1, minutes=10))
    a2 = land(client, comp, h["a"], _result(_outcomes(0.9, 10)))
    for who in ({}, h["b"]):
        board = _get(client, comp, who)
        assert (board["phase"], board["frozen"]) == ("frozen", True)
        assert [(x["team"], x["submission_id"]) for x in board["entries"]][1] == ("a", a1)
        assert not any(x["live"] for x in board["entries"])
    mine = _get(client, comp, h["a"])["entries"]
    assert [(x["team"], x["submission_id"], x["live"], x["rank"]) for x in mine][0] == ("a", a2, True, None)
    assert any(x["submission_id"] == a1 and not x["live"] for x in mine)
    assert _get(client, comp, org)["frozen"] is False  # the organizer watches the live board

    # Closed: the private board is public, with private numbers; the public board is live again; configs show.
    clock(timedelta(hours=2, minutes=1))
    private = _get(client, comp, board="private")
    assert private["phase"] == "closed"
    assert [x["submission_id"] for x in private["entries"]][0] == a2
    assert all(x["private_accuracy"] is not None and x["config"] is not None for x in private["entries"])
    public = _get(client, comp, h["b"])
    assert (public["frozen"], public["entries"][0]["submission_id"]) == (False, a2)


def test_configs_show_to_their_team_only_until_a_revealing_close(client, db, admin_headers, clock):
    deadline = utcnow() + timedelta(hours=1)
    for reveal in (False, True):
        clock(timedelta(0))
        comp, org, h = _contest(client, admin_headers, ["a", "b"], deadline=deadline.isoformat(),
                                reveal_configs=reveal)
        land(client, comp, h["a"], _result(_outcomes(0.6, 11)))
        land(client, comp, h["b"], _result(_outcomes(0.7, 12)))
        seen = {t: {x["team"]: x["config"] is not None for x in _get(client, comp, h[t])["entries"]} for t in h}
        assert seen == {"a": {"a": True, "b": False}, "b": {"a": False, "b": True}}
        assert all(x["config"] for x in _get(client, comp, org)["entries"])
        clock(timedelta(hours=1, minutes=1))
        after = {x["team"]: x["config"] is not None for x in _get(client, comp, h["a"])["entries"]}
        assert after == {"a": True, "b": reveal}


def test_export_round_trips_and_keeps_private_columns_back_until_the_close(client, db, admin_headers, clock):
    comp, org, h = _contest(client, admin_headers, ["a", "b"], seeds=[0, 1],
                            deadline=(utcnow() + timedelta(hours=1)).isoformat())
    land(client, comp, h["a"], [_result(_outcomes(0.6, 13), ece=0.1), _result(_outcomes(0.62, 14), ece=0.12)])
    land(client, comp, h["b"], _result(_outcomes(0.8, 15), ece=0.05))
    url = f"/api/competitions/{comp['slug']}/leaderboard/export"
    for who, private in ((h["a"], False), (org, True)):
        as_json = client.get(url, params={"format": "json"}, headers=who).json()
        as_csv = client.get(url, params={"format": "csv"}, headers=who)
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert from_csv(as_csv.text) == as_json["rows"]
        assert as_json["columns"] == list(as_json["rows"][0])
        assert {"seed1_accuracy", "seed2_accuracy", "gpu_hours", "ece", "final"} <= set(as_json["columns"])
        assert ("private_accuracy" in as_json["columns"]) is private
    r = client.get(url, params={"board": "private"}, headers=h["a"])
    assert r.status_code == 403
    clock(timedelta(hours=1, minutes=1))
    rows = client.get(url, params={"board": "private", "format": "json"}, headers=h["a"]).json()["rows"]
    assert all(r["private_accuracy"] is not None and r["seed1_private_accuracy"] is not None for r in rows)


def test_a_baseline_is_a_marked_unranked_line_on_both_boards(client, db, admin_headers):
    from tests.factories import finish_runs

    comp, org, h = _contest(client, admin_headers, ["a", "b"])
    land(client, comp, h["a"], _result(_outcomes(0.9, 16)))
    land(client, comp, h["b"], _result(_outcomes(0.5, 17)))
    r = client.post(f"/api/competitions/{comp['slug']}/baselines", json={"config": {"batch_size": 64}}, headers=org)
    assert r.status_code == 201, r.text
    finish_runs(r.json()["id"], [_result(_outcomes(0.7, 18))])
    for board in ("public", "private"):
        entries = _get(client, comp, org, board=board)["entries"]
        assert [(e["team"], e["kind"], e["rank"]) for e in entries] == [
            ("a", "train", 1), ("Baseline", "baseline", None), ("b", "train", 2)]
        assert entries[1]["baseline"] and entries[1]["submission_id"] == r.json()["id"]
    assert [e["kind"] for e in _get(client, comp, h["b"])["entries"]] == ["train", "baseline", "train"]


def test_the_private_board_judges_what_landed_by_the_deadline_among_the_latest_marks(client, db, admin_headers,
                                                                                   clock):
    from tests.factories import finish_runs, submit

    comp, org, h = _contest(client, admin_headers, ["a", "b"], final_entries=2,
                            deadline=(utcnow() + timedelta(hours=1)).isoformat())
    url = f"/api/competitions/{comp['slug']}/final-entries"
    a_best = land(client, comp, h["a"], _result(_outcomes(0.8, 20)))
    a_low = land(client, comp, h["a"], _result(_outcomes(0.6, 21)))
    a_queued = submit(client, comp, h["a"], lr=0.3, batch_size=32)["id"]
    # a marks only an entry that then fails: judged on its best public entry, not dropped from the board.
    assert client.put(url, json={"submission_ids": [a_queued]}, headers=h["a"]).status_code == 200
    finish_runs(a_queued, [{"status": "failed", "error": "diverged"}])
    assert [x["submission_id"] for x in _get(client, comp, org, board="private")["entries"]] == [a_best]
    # b marks two, then the organizer lowers the limit to one: the latest marked counts.
    b1 = land(client, comp, h["b"], _result(_outcomes(0.9, 22)))
    b2 = land(client, comp, h["b"], _result(_outcomes(0.5, 23)))
    assert client.put(url, json={"submission_ids": [b1]}, headers=h["b"]).status_code == 200
    assert client.put(url, json={"submission_ids": [b1, b2]}, headers=h["b"]).status_code == 200
    r = client.patch(f"/api/competitions/{comp['slug']}", json={"final_entries": 1}, headers=org)
    assert r.status_code == 200, r.text
    private = {x["team"]: x["submission_id"] for x in _get(client, comp, org, board="private")["entries"]}
    assert private == {"a": a_best, "b": b2}  # b2, marked last, though b1 scores better
    # A result that lands after the deadline changes neither board's judgement of the final entries.
    late = submit(client, comp, h["a"], lr=0.4, batch_size=32)["id"]
    clock(timedelta(hours=1, minutes=5))
    finish_runs(late, [_result(_outcomes(0.99, 24))])
    after = {x["team"]: x["submission_id"] for x in _get(client, comp, h["b"], board="private")["entries"]}
    assert after == private
    assert a_low not in after.values()


def test_a_stale_board_is_served_while_the_workers_refresh_it(client, db, admin_headers, monkeypatch):
    from app.config import get_settings
    from app.leaderboard import board

    comp, _, h = _contest(client, admin_headers, ["a", "b"])
    land(client, comp, h["a"], _result(_outcomes(0.7, 25)))
    first = _get(client, comp)
    monkeypatch.setenv("HPARENA_BOARD_STALE_GRACE_SECONDS", "600")
    get_settings.cache_clear()
    land(client, comp, h["b"], _result(_outcomes(0.8, 26)))
    stale = _get(client, comp)  # a worker will refresh it within seconds: the request does not compute
    assert stale["stale"] and stale["computed_at"] == first["computed_at"]
    assert [x["team"] for x in stale["entries"]] == ["a"]
    assert board.refresh_stale() == [comp["id"]]  # what each worker's parent polls
    fresh = _get(client, comp)
    assert not fresh["stale"] and [x["team"] for x in fresh["entries"]] == ["b", "a"]
    assert board.refresh_stale() == []
