from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class Entry(BaseModel):
    rank: int
    team: str
    team_id: int
    submission_id: int
    accuracy: float
    gpu_hours: float | None
    submissions: int
    best_at: datetime


class Board(BaseModel):
    competition: str
    title: str
    entries: list[Entry]
