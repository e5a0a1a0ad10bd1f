from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class Entry(BaseModel):
    rank: int
    team: str
    team_id: int
    submission_id: int
    accuracy: float
    gpu_hours: float | None = Field(description="Device-hours of the entry's runs, in the board's cost_unit.")
    submissions: int
    best_at: datetime
    device_mismatch: bool = Field(description="A run of this entry ran on a device that is not the competition's "
                                              "hardware class: its result was not measured on identical hardware.")


class Board(BaseModel):
    competition: str
    title: str
    hardware_class: str
    cost_unit: str = Field(description="What gpu_hours counts: gpu-hours, or cpu-hours on a CPU hardware class.")
    entries: list[Entry]
