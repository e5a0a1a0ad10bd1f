"""The worker refreshes the cached boards as a result lands: a reader finds them fresh, with no recompute."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.leaderboard.models import BoardCache
from tests.factories import join, make_competition, make_organizer, submit

pytestmark = pytest.mark.slow


def test_a_landed_result_refreshes_the_cached_board(client, db, admin_headers, tiny_cifar):
    from worker.tasks import train_run

    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, dataset={"name": "cifar10", "path": str(tiny_cifar)},
                            budget={"max_epochs": 1})
    student = join(client, comp["slug"])
    slug = comp["slug"]
    before = client.get(f"/api/competitions/{slug}/leaderboard").json()
    assert before["entries"] == []
    sub = submit(client, comp, student, batch_size=32)
    with session_scope() as s:  # a queued submission changes no board
        row = s.scalar(select(BoardCache).where(BoardCache.competition_id == comp["id"]))
        assert row.computed_version == row.version
        version = row.version
    assert train_run.apply().get() == "succeeded"
    with session_scope() as s:  # refreshed by the worker, before anyone asked
        row = s.scalar(select(BoardCache).where(BoardCache.competition_id == comp["id"]))
        assert row.computed_version == row.version > version
        assert [e["submission_id"] for e in row.payload["public"]["entries"]] == [sub["id"]]
        assert row.payload["public"]["bands"]["available"] is True
        computed_at = row.computed_at
    board = client.get(f"/api/competitions/{slug}/leaderboard").json()
    assert board["computed_at"].startswith(computed_at.isoformat()[:19])
    assert board["entries"][0]["seed_scores"][0]["accuracy"] == board["entries"][0]["accuracy"]
    assert board["entries"][0]["ece"] is not None
