"""The insights page: who sees it when, Optuna's importance on planted results, the Pareto front, what a
participant sees after the close when configs are not revealed, and no importance where the rank bands tell no
two submissions apart."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import numpy as np
import pytest

from app.leaderboard import bands
from app.leaderboard.insights import MIN_TRIALS
from tests.factories import finish_runs, join, land, make_competition, make_organizer

SPACE = {"lr": {"min": 0.001, "max": 1.0}, "batch_size": {"choices": [32, 64, 100]},
         "weight_decay": {"min": 0.0, "max": 0.01}}


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _get(client, path: str, headers: dict[str, str] | None = None, **kw):
    """GET a page as a browser would: signed in by the cookie (or signed out), never the Authorization header."""
    client.cookies.clear()
    if headers is not None:
        client.cookies.set("hparena_token", _token(headers))
    return client.get(path, headers={"Accept": "text/html"}, **kw)


class _Page(HTMLParser):
    """The attributes of every element, in document order, with the id of each enclosing table."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self._tables: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._tables.append(a.get("id"))
        self.elements.append((tag, a, self._tables[-1] if self._tables else None))

    def handle_endtag(self, tag):
        if tag == "table" and self._tables:
            self._tables.pop()

    def rows(self, table: str, attr: str) -> list[dict[str, str]]:
        return [a for tag, a, t in self.elements if tag == "tr" and t == table and attr in a]

    def has(self, tag: str, **attrs: str) -> bool:
        return any(t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
                   for t, a, _ in self.elements)

    def param_charts(self) -> list[str]:
        return [a["data-param"] for tag, a, _ in self.elements if tag == "canvas" and "data-param" in a]


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="insights-data">(.*?)</script>', html, re.S)
    assert m, html
    return json.loads(m.group(1))


def _world(client, admin_headers, *, n: int, **overrides):
    """A competition closing in an hour, three teams, and `n` succeeded submissions whose public accuracy
    depends on lr alone (a peak at lr = 0.1); batch_size and weight_decay vary at random, and label_smoothing
    (which the search space leaves free) varies too. -> (comp, organizer, teams, planted rows)."""
    org = make_organizer(client, admin_headers)
    deadline = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    comp = make_competition(client, org, search_space=SPACE, deadline=deadline, **overrides)
    teams = [join(client, comp["slug"], name=f"p{i}", team=f"team-{i}") for i in range(3)]
    rng = np.random.default_rng(7)
    planted = []
    for i in range(n):
        lr = float(10 ** rng.uniform(-3, 0))
        config = {"lr": round(lr, 7), "batch_size": int(rng.choice([32, 64, 100])),
                  "weight_decay": round(float(rng.uniform(0, 0.01)), 6),
                  "label_smoothing": round(float(rng.uniform(0, 0.2)), 4)}
        accuracy = 0.9 - 0.15 * (math.log10(lr) + 1) ** 2 + 0.01 * float(rng.standard_normal())
        gpu_seconds = float(rng.uniform(60, 3600))
        sub = land(client, comp, teams[i % 3], {"accuracy": accuracy, "private_accuracy": 0.123456 + i * 1e-6,
                                                "gpu_seconds": gpu_seconds}, **config)
        planted.append({"id": sub, "accuracy": accuracy, "hours": gpu_seconds / 3600, "config": config})
    return comp, org, teams, planted


def test_organizers_see_insights_during_the_contest_and_everyone_after_the_close(client, admin_headers, clock):
    comp, org, teams, _ = _world(client, admin_headers, n=2)
    path = f"/competitions/{comp['slug']}/insights"
    other_org = make_organizer(client, admin_headers, name="other-prof")

    r = _get(client, path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fcompetitions%2F" + comp["slug"] + \
        "%2Finsights"
    for who in (teams[0], other_org):
        r = _get(client, path, who)
        assert r.status_code == 403, r.text
        assert 'data-page="error"' in r.text and "chart-pareto" not in r.text
    for who in (org, admin_headers):
        r = _get(client, path, who)
        assert r.status_code == 200, r.text
        assert 'data-page="insights"' in r.text and _Page(r.text).has("canvas", id="chart-pareto")
    assert _get(client, "/competitions/no-such-comp/insights", org).status_code == 404

    clock(timedelta(hours=1, minutes=1))
    for who in (None, teams[0], other_org):
        r = _get(client, path, who)
        assert r.status_code == 200, r.text
        assert _Page(r.text).has("canvas", id="chart-pareto")


def test_importance_ranks_the_planted_param_first_and_the_front_is_the_boards(client, admin_headers):
    comp, org, teams, planted = _world(client, admin_headers, n=30)
    # Left out: a baseline (the organizers' reference line) and a failed submission.
    r = client.post(f"/api/competitions/{comp['slug']}/baselines",
                    json={"config": {"lr": 0.1, "batch_size": 64}}, headers=org)
    assert r.status_code == 201, r.text
    finish_runs(r.json()["id"], [{"accuracy": 0.99, "gpu_seconds": 1.0}])
    land(client, comp, teams[0], {"status": "failed", "gpu_seconds": 5.0}, lr=0.2)

    r = _get(client, f"/competitions/{comp['slug']}/insights", org)
    assert r.status_code == 200, r.text
    page = _Page(r.text)
    assert re.search(r'id="insights-trials">30<', r.text)
    rows = page.rows("importance", "data-param")
    assert [row["data-param"] for row in rows][0] == "lr", rows
    # label_smoothing is outside the search space but varies: it counts, bounded by the values seen.
    assert {row["data-param"] for row in rows} == {"lr", "batch_size", "weight_decay", "label_smoothing"}
    shares = [float(row["data-importance"]) for row in rows]
    assert shares == sorted(shares, reverse=True) and math.isclose(sum(shares), 1.0, rel_tol=1e-6)
    assert shares[0] > 0.5
    assert not page.has("div", id="insights-note")

    # One chart per varying hyperparameter (the space's first), lr on a log axis, batch_size on a category axis.
    assert page.param_charts() == ["lr", "batch_size", "weight_decay", "label_smoothing"]
    data = _data(r.text)
    charts = {c["name"]: c for c in data["params"]}
    assert charts["lr"]["kind"] == "numeric" and charts["lr"]["log"] is True
    assert charts["batch_size"]["kind"] == "categorical" and charts["batch_size"]["labels"] == ["32", "64", "100"]
    assert len(charts["lr"]["points"]) == 30

    # The front is bands.pareto_front over the same accuracies and hours (the board's own function).
    front = bands.pareto_front([p["accuracy"] for p in planted], [p["hours"] for p in planted])
    assert any(front) and not all(front)
    expected = {p["id"] for p, on in zip(planted, front, strict=True) if on}
    assert {p["submission_id"] for p in data["pareto"] if p["front"]} == expected
    assert {p["submission_id"] for p in data["pareto"]} == {p["id"] for p in planted}
    # Public numbers only: the private half's never appear on the page.
    assert "0.123456" not in r.text and "12.3456" not in r.text


def test_too_few_submissions_show_how_many_are_needed(client, admin_headers):
    comp, org, teams, _ = _world(client, admin_headers, n=9)
    r = _get(client, f"/competitions/{comp['slug']}/insights", org)
    assert r.status_code == 200, r.text
    page = _Page(r.text)
    assert page.has("div", id="insights-note")
    note = re.search(r'id="insights-note"[^>]*>(.*?)</div>', r.text, re.S).group(1)
    assert "at least 10 succeeded submissions" in note and "are 9 so far" in note
    assert not page.rows("importance", "data-param")
    assert page.param_charts() == ["lr", "batch_size", "weight_decay", "label_smoothing"]  # no minimum for charts

    # The tenth result lands: a new board version, so the memoised analysis is computed again.
    land(client, comp, teams[0], {"accuracy": 0.5, "gpu_seconds": 100.0}, lr=0.002, batch_size=64)
    page = _Page(_get(client, f"/competitions/{comp['slug']}/insights", org).text)
    assert not page.has("div", id="insights-note")
    assert len(page.rows("importance", "data-param")) == 4


@pytest.mark.parametrize("reveal", [False, True], ids=["hidden", "revealed"])
def test_after_the_close_configs_show_only_when_revealed(client, admin_headers, clock, reveal):
    comp, org, teams, planted = _world(client, admin_headers, n=12, reveal_configs=reveal)
    clock(timedelta(hours=1, minutes=1))
    for who in (None, teams[0]):
        r = _get(client, f"/competitions/{comp['slug']}/insights", who)
        assert r.status_code == 200, r.text
        page, data = _Page(r.text), _data(r.text)
        # The aggregates, for everyone: importance and accuracy against GPU-hours.
        assert {row["data-param"] for row in page.rows("importance", "data-param")} == {*SPACE, "label_smoothing"}
        assert len(data["pareto"]) == 12
        assert all("submission_id" not in p for p in data["pareto"])  # organizers only
        lrs = {json.dumps(p["config"]["lr"]) for p in planted}
        if reveal:
            assert page.param_charts() == ["lr", "batch_size", "weight_decay", "label_smoothing"]
            assert {p["team"] for p in data["pareto"]} == {"team-0", "team-1", "team-2"}
            assert lrs <= {json.dumps(p["x"]) for p in data["params"][0]["points"]}
        else:
            assert page.param_charts() == [] and data["params"] == []
            assert all("team" not in p for p in data["pareto"])
            for team in ("team-0", "team-1", "team-2"):
                assert team not in r.text
            leaked = [lr for lr in lrs if re.search(r"(?<![\d.])" + re.escape(lr) + r"(?!\d)", r.text)]
            assert not leaked, leaked
            assert "did not reveal configs" in r.text


def _outcomes_result(correct: list[bool], labels: list[int]) -> dict:
    """finish()'s fields for planted per-image outcomes: the accuracies of each half are what they give."""
    from worker.engine.split import public_private_indices

    public, private = public_private_indices(len(correct))
    return {"correct": correct, "labels": labels, "accuracy": sum(correct[i] for i in public) / len(public),
            "private_accuracy": sum(correct[i] for i in private) / len(private), "gpu_seconds": 100.0}


def test_no_signal_when_the_rank_bands_tell_no_two_submissions_apart(client, admin_headers):
    """Ten submissions at chance, within two public images of each other (three images all one way are
    already significant for the paired bootstrap): the board's bands put them all at rank 1, so no
    hyperparameter is credited. A clearly better eleventh brings the ranking back."""
    from worker.engine.split import public_private_indices

    n = 1000
    labels = [i % 10 for i in range(n)]
    rng = np.random.default_rng(11)
    chance = [bool(x) for x in rng.random(n) < 0.1]
    missed = [j for j in public_private_indices(n)[0] if not chance[j]]
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, search_space=SPACE)
    teams = [join(client, comp["slug"], name=f"p{i}", team=f"team-{i}") for i in range(3)]
    for i in range(MIN_TRIALS):
        correct = list(chance)
        for j in missed[2 * i:2 * i + i % 3]:  # 0, 1 or 2 more public images right, different ones each time
            correct[j] = True
        lr = round(float(10 ** rng.uniform(-3, 0)), 6)
        land(client, comp, teams[i % 3], _outcomes_result(correct, labels), lr=lr,
             batch_size=int(rng.choice([32, 64, 100])))
    path = f"/competitions/{comp['slug']}/insights"

    r = _get(client, path, org)
    assert r.status_code == 200, r.text
    page = _Page(r.text)
    assert re.search(r'id="insights-trials">10<', r.text)
    note = re.search(r'id="insights-note"[^>]*>(.*?)</div>', r.text, re.S).group(1)
    assert "No signal yet: no submission is significantly better than another (rank bands, α = 0.05)" in note
    assert "at least 10" not in note
    assert page.has("p", id="importance-no-signal") and not page.has("p", id="importance-empty")
    assert page.has("table", id="importance") and not page.rows("importance", "data-param")
    assert "data-importance" not in r.text
    # The charts still show the (flat) data.
    assert page.param_charts() == ["lr", "batch_size"]
    assert len(_data(r.text)["pareto"]) == MIN_TRIALS

    # A clearly better submission: the bands now separate it from the rest, and importance is ranked again.
    better = [bool(x) for x in rng.random(n) < 0.6]
    land(client, comp, teams[0], _outcomes_result(better, labels), lr=0.1, batch_size=64)
    r = _get(client, path, org)
    page = _Page(r.text)
    assert not page.has("div", id="insights-note") and not page.has("p", id="importance-no-signal")
    rows = page.rows("importance", "data-param")
    assert {row["data-param"] for row in rows} == {"lr", "batch_size"}
    assert math.isclose(sum(float(row["data-importance"]) for row in rows), 1.0, rel_tol=1e-6)
