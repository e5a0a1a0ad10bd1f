from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class SeedScore(BaseModel):
    seed: int
    accuracy: float | None


class Entry(BaseModel):
    position: int = Field(description="Order on this board: by band rank, then mean accuracy (a tie-break "
                                      "within a band is not significant: see `tie`).")
    rank: int | None = Field(description="Band rank: 1 + the number of entries significantly better than this "
                                         "one (see the board's `bands`). Entries sharing a rank form a band. "
                                         "Null for a baseline or a team's own live row after the freeze.")
    tie: bool = Field(description="Shares its rank with another entry: its order within the band is a "
                                  "tie-break, not a significant difference.")
    team: str
    team_id: int
    submission_id: int
    kind: Literal["train", "ensemble", "baseline"] = Field(description="train; ensemble (scored from its "
                                                                       "members' stored logits); baseline (the "
                                                                       "organizer's reference line, unranked).")
    members: list[int] | None = Field(None, description="An ensemble's member submissions.")
    baseline: bool
    final: bool = Field(description="Marked final by its team (the private board ranks each team's best final "
                                    "entry; a team that marked none is judged by its best public entry).")
    live: bool = Field(False, description="After the freeze: your own team's current scores, which others "
                                          "don't see until the close (unranked).")
    accuracy: float | None = Field(description="Mean public-half accuracy over the entry's seeds.")
    accuracy_std: float | None = Field(description="Sample standard deviation across seeds (null: one seed).")
    seed_scores: list[SeedScore] = Field(description="Each seed's public accuracy.")
    ece: float | None = Field(description="Expected calibration error on the public half, mean over seeds.")
    private_accuracy: float | None = Field(None, description="Private half: only on the private board or "
                                                             "export after the close, or to organizers.")
    private_accuracy_std: float | None = None
    private_seed_scores: list[SeedScore] | None = None
    private_ece: float | None = None
    gpu_hours: float | None = Field(description="Device-hours of the entry's runs, in the board's cost_unit "
                                                "(an ensemble: its members' sum).")
    pareto: bool = Field(description="On the Pareto front of accuracy against GPU-hours.")
    submissions: int = Field(description="Submissions the team made.")
    best_at: datetime = Field(description="When this entry was submitted: the team's last improvement.")
    device_mismatch: bool = Field(description="A run of this entry ran on a device that is not the competition's "
                                              "hardware class: its result was not measured on identical hardware.")
    config: dict[str, Any] | None = Field(None, description="Shown to its own team; to everyone after the close "
                                                            "when the organizer reveals configs.")


class Bands(BaseModel):
    test: str = Field(description="How bands are computed.")
    alpha: float
    resamples: int
    seed: int = Field(description="The bootstrap's fixed RNG seed: the same results give the same bands.")
    available: bool = Field(description="False when some entry has no stored per-image results (runs from "
                                        "before rank bands): such entries are ordered by mean only.")


class Board(BaseModel):
    competition: str
    title: str
    hardware_class: str
    cost_unit: str = Field(description="What gpu_hours counts: gpu-hours, or cpu-hours on a CPU hardware class.")
    board: Literal["public", "private"]
    view: Literal["accuracy", "efficiency"] = Field(description="accuracy: every entry by band rank; efficiency: "
                                                                "the Pareto front, cheapest first.")
    phase: Literal["open", "frozen", "closed"]
    frozen: bool = Field(description="This is the board as it stood at freeze_at.")
    freeze_at: datetime | None
    deadline: datetime | None
    bands: Bands
    computed_at: datetime
    stale: bool = Field(description="A newer result is being ranked right now; this is the previous board.")
    entries: list[Entry]
