from datetime import timedelta

from app.db import utcnow
from tests.factories import (
    CompetitionFactory,
    MembershipFactory,
    SubmissionFactory,
    TeamFactory,
    UserFactory,
    bind,
)


def _team(comp, name):
    team = TeamFactory(competition=comp, name=name)
    user = UserFactory()
    MembershipFactory(user_id=user.id, team_id=team.id, competition_id=comp.id)
    return team, user


def _sub(comp, team, user, acc, gpu, status="succeeded", minutes_ago=60):
    return SubmissionFactory(competition_id=comp.id, team_id=team.id, user_id=user.id, accuracy=acc,
                             gpu_seconds=gpu, status=status, created_at=utcnow() - timedelta(minutes=minutes_ago))


def test_best_per_team_ranked_with_tie_breaks(client, db):
    bind(db)
    comp = CompetitionFactory()
    a, ua = _team(comp, "a")
    b, ub = _team(comp, "b")
    c, uc = _team(comp, "c")
    d, ud = _team(comp, "d")
    _sub(comp, a, ua, 0.70, 100)
    best_a = _sub(comp, a, ua, 0.80, 300)
    _sub(comp, a, ua, None, 50, status="failed")
    _sub(comp, b, ub, 0.80, 200, minutes_ago=10)  # same accuracy as a's best, fewer GPU-seconds: ahead
    _sub(comp, c, uc, 0.80, 300, minutes_ago=5)   # ties a exactly but later: behind a
    _sub(comp, d, ud, 0.99, 10, status="diverged")  # never ranked

    board = client.get(f"/api/competitions/{comp.slug}/leaderboard").json()
    entries = board["entries"]
    assert [e["team"] for e in entries] == ["b", "a", "c"]
    assert [e["rank"] for e in entries] == [1, 2, 3]
    assert entries[1]["submission_id"] == best_a.id
    assert entries[1]["submissions"] == 3
    assert abs(entries[1]["gpu_hours"] - 300 / 3600) < 1e-9
    assert entries[0]["accuracy"] == 0.80


def test_empty_leaderboard_and_unknown_competition(client, db):
    bind(db)
    comp = CompetitionFactory()
    assert client.get(f"/api/competitions/{comp.slug}/leaderboard").json()["entries"] == []
    assert client.get("/api/competitions/missing/leaderboard").status_code == 404
