import itertools
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import migrate
from app.db import session_scope, utcnow
from app.leaderboard import service as board_service
from app.submissions import runs as run_service
from app.submissions.models import Run, RunStatus
from tests.factories import (
    CompetitionFactory,
    SubmissionFactory,
    bind,
    join,
    make_competition,
    make_organizer,
    team_member,
)


def _sub(comp, team, user, acc, gpu, status="succeeded", minutes_ago=60):
    return SubmissionFactory(competition_id=comp.id, team_id=team.id, user_id=user.id, accuracy=acc,
                             gpu_seconds=gpu, status=status, created_at=utcnow() - timedelta(minutes=minutes_ago))


def test_best_per_team_ranked_with_tie_breaks(client, db):
    bind(db)
    comp = CompetitionFactory()
    a, ua = team_member(comp, "a")
    b, ub = team_member(comp, "b")
    c, uc = team_member(comp, "c")
    d, ud = team_member(comp, "d")
    _sub(comp, a, ua, 0.70, 100)
    best_a = _sub(comp, a, ua, 0.80, 300)
    _sub(comp, a, ua, None, 50, status="failed")
    _sub(comp, b, ub, 0.80, 200, minutes_ago=10)  # same accuracy as a's best, fewer GPU-seconds: ahead
    _sub(comp, c, uc, 0.80, 300, minutes_ago=5)   # ties a exactly but later: behind a
    _sub(comp, d, ud, 0.99, 10, status="diverged")  # never ranked

    board = client.get(f"/api/competitions/{comp.slug}/leaderboard").json()
    entries = board["entries"]
    assert [e["team"] for e in entries] == ["b", "a", "c"]
    assert [e["position"] for e in entries] == [1, 2, 3]
    # Equal means and no per-image results to test: one band, ordered by the tie-breaks, marked as ties.
    assert [e["rank"] for e in entries] == [1, 1, 1]
    assert all(e["tie"] for e in entries)
    assert entries[1]["submission_id"] == best_a.id
    assert entries[1]["submissions"] == 3
    assert abs(entries[1]["gpu_hours"] - 300 / 3600) < 1e-9
    assert entries[0]["accuracy"] == 0.80


def test_empty_leaderboard_and_unknown_competition(client, db):
    bind(db)
    comp = CompetitionFactory()
    assert client.get(f"/api/competitions/{comp.slug}/leaderboard").json()["entries"] == []
    assert client.get("/api/competitions/missing/leaderboard").status_code == 404


# ---- the board as submissions land: POSTed over HTTP, their runs finished the way a worker finishes them ----


def _contest(client, admin_headers, *teams):
    comp = make_competition(client, make_organizer(client, admin_headers))
    return comp, {t: join(client, comp["slug"], name=f"{t}-user", team=t) for t in teams}


_lr = itertools.count(1)


def _submit(client, comp, headers) -> int:
    """A config of its own each time: an identical one would reuse the earlier run's result (dedup)."""
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"lr": 0.05 + next(_lr) / 1000, "batch_size": 32}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _claim(submission_id):
    with session_scope() as s:
        run_id = s.scalar(select(Run.id).where(Run.submission_id == submission_id))
        return run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3)


def _finish(claimed, accuracy, gpu_seconds=100.0, status=RunStatus.succeeded):
    with session_scope() as s:
        assert run_service.finish(s, claimed, status, accuracy=accuracy, gpu_seconds=gpu_seconds) is None


def _land(client, comp, headers, accuracy, gpu_seconds=100.0, status=RunStatus.succeeded) -> int:
    sub = _submit(client, comp, headers)
    _finish(_claim(sub), accuracy, gpu_seconds, status)
    return sub


def _board(client, comp):
    r = client.get(f"/api/competitions/{comp['slug']}/leaderboard")
    assert r.status_code == 200, r.text
    return r.json()["entries"]


def _best(client, comp):
    return {e["team"]: (e["rank"], e["submission_id"], e["accuracy"], e["submissions"]) for e in _board(client, comp)}


def test_a_better_submission_takes_over_and_a_worse_one_changes_nothing(client, db, admin_headers):
    comp, h = _contest(client, admin_headers, "a", "b")
    a1 = _land(client, comp, h["a"], 0.70)
    b1 = _land(client, comp, h["b"], 0.80)
    assert _best(client, comp) == {"b": (1, b1, 0.80, 1), "a": (2, a1, 0.70, 1)}

    a2 = _land(client, comp, h["a"], 0.90)
    assert _best(client, comp) == {"a": (1, a2, 0.90, 2), "b": (2, b1, 0.80, 1)}
    assert [e["team"] for e in _board(client, comp)] == ["a", "b"]

    _land(client, comp, h["a"], 0.60)                                   # worse
    _land(client, comp, h["a"], 0.99, status=RunStatus.diverged)       # not succeeded: never ranked
    _submit(client, comp, h["a"])                                       # still queued: counted, not ranked
    assert _best(client, comp) == {"a": (1, a2, 0.90, 5), "b": (2, b1, 0.80, 1)}


def test_ties_break_on_gpu_seconds_then_the_earlier_submission(client, db, admin_headers):
    comp, h = _contest(client, admin_headers, "a")
    first = _land(client, comp, h["a"], 0.80, gpu_seconds=300)
    _land(client, comp, h["a"], 0.80, gpu_seconds=300)                 # an exact tie, but later: not better
    assert _board(client, comp)[0]["submission_id"] == first
    cheaper = _land(client, comp, h["a"], 0.80, gpu_seconds=200)
    entry = _board(client, comp)[0]
    assert (entry["submission_id"], entry["gpu_hours"], entry["submissions"]) == (cheaper, 200 / 3600, 3)


def test_the_0006_backfill_rebuilds_the_same_board(client, db, admin_headers, database_url):
    comp, h = _contest(client, admin_headers, "a", "b", "c")
    for team, results in {"a": ((0.7, 100), (0.9, 200), (0.8, 50)), "b": ((0.9, 150), (0.5, 10)),
                          "c": ((0.6, 100),)}.items():
        for acc, gpu in results:
            _land(client, comp, h[team], acc, gpu_seconds=gpu)
    _land(client, comp, h["c"], None, status=RunStatus.failed)
    before = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()
    assert [e["team"] for e in before["entries"]] == ["b", "a", "c"]  # b's 0.9 took fewer GPU-seconds
    db.close()
    migrate.downgrade(database_url, "0005")
    migrate.upgrade(database_url)
    after = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()
    assert after.pop("computed_at") >= before.pop("computed_at")  # 0008 made the cache anew
    assert after == before


def test_two_of_a_teams_submissions_finishing_at_once_keep_the_better(client, db, admin_headers, database_url,
                                                                      monkeypatch):
    """The worse one reads the team's best first and is held there; the better one finishes meanwhile. The
    better must wait for the worse one's lock and compare against its outcome: read without the lock, the
    worse one would go on to overwrite the better with its comparison against the old best."""
    if not database_url.startswith("postgresql"):
        pytest.skip("row locks: SQLite runs one writer at a time")
    comp, h = _contest(client, admin_headers, "a")
    _land(client, comp, h["a"], 0.50)
    better, worse = _submit(client, comp, h["a"]), _submit(client, comp, h["a"])
    c_better, c_worse = _claim(better), _claim(worse)

    has_read, go_on = threading.Event(), threading.Event()
    set_best = board_service._set_best

    def held_after_reading(session, sub, scope):
        if sub.id == worse:
            has_read.set()
            go_on.wait(30)
        set_best(session, sub, scope)

    monkeypatch.setattr(board_service, "_set_best", held_after_reading)
    threads = {sub: threading.Thread(target=_finish, args=(c, acc))
               for sub, c, acc in ((worse, c_worse, 0.85), (better, c_better, 0.90))}
    threads[worse].start()
    assert has_read.wait(30)
    threads[better].start()
    time.sleep(0.5)
    better_waited = threads[better].is_alive()
    go_on.set()
    for t in threads.values():
        t.join(30)
    assert better_waited  # on the worse one's lock on the team's row
    assert _best(client, comp) == {"a": (1, better, 0.90, 3)}
