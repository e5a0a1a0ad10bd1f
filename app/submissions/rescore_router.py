"""Rescores (app.submissions.rescore): started and read by the competition's organizer or an admin."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.auth.dependencies import CurrentOrganizer, SessionDep
from app.competitions.service import get_competition
from app.http import BODY_ERRORS, error_responses
from app.submissions import rescore

router = APIRouter(prefix="/api/competitions", tags=["rescores"])
RescoreId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class RescoreCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    submission_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] | None = Field(
        None, min_length=1, description="The entries to re-run: succeeded train submissions (baselines too; an "
                                        "ensemble trains nothing). Null: every final entry (each team's marked "
                                        "final, else its best).")
    threshold: float = Field(rescore.DEFAULT_THRESHOLD, ge=0, le=1, description=(
        "Kendall tau counts only pairs of entries whose public accuracy before differs by more than this."))
    seeds: list[Seed] | None = Field(None, min_length=1, max_length=64, description=(
        "Seeds for the new runs, none used before in this competition. Null: as many fresh seeds as the "
        "competition has."))

    @field_validator("submission_ids", "seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("must be distinct")
        return v


class RescoreRunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    seed: int
    status: str
    accuracy: float | None = Field(description="Public half.")
    private_accuracy: float | None


class RescoreEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    submission_id: int
    team_id: int
    team: str
    status: str = Field(description="Of its runs in this rescore's round.")
    before_accuracy: float | None = Field(description="Its mean public accuracy when the rescore started.")
    after_accuracy: float | None = Field(description="The mean over this round's runs, once they all succeeded "
                                                     "(its score from then on).")
    before_private_accuracy: float | None
    after_private_accuracy: float | None
    runs: list[RescoreRunOut]


class TauOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    tau: float | None = Field(description="(concordant - discordant) / (concordant + discordant); null when "
                                          "both are 0.")
    pairs: int = Field(description="Pairs of entries scored before and after whose score before differs by more "
                                   "than the threshold: concordant + discordant + tied_after.")
    concordant: int = Field(description="Pairs the scores after order the same way.")
    discordant: int = Field(description="Pairs the scores after order the other way.")
    tied_after: int = Field(description="Pairs tied after: counted as neither.")
    within_threshold: int = Field(description="Pairs left out: their scores before were this close or closer.")


class RescoreOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    competition: str
    round: int = Field(description="The scoring round its runs belong to (runs' `round`).")
    seeds: list[int]
    threshold: float
    submission_ids: list[int]
    created_at: datetime
    created_by_id: int | None
    status: str = Field(description="running while any of its runs is queued or running; then done.")
    entries: list[RescoreEntryOut]
    failed: list[int] = Field(description="Once done: entries with a run that did not succeed (their scores "
                                          "stay as they were, and they are left out of tau).")
    public: TauOut | None = Field(description="Once done: Kendall tau between the public scores before and after.")
    private: TauOut | None = Field(description="The same over the private half.")


@router.post("/{slug}/rescores", response_model=RescoreOut, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 404, 409, *BODY_ERRORS))
def start_rescore(slug: str, data: RescoreCreate, session: SessionDep, user: CurrentOrganizer):
    """Re-run entries with fresh seeds (new runs, the old ones kept), charged to no team; report Kendall tau
    between the scores before and after once they are over."""
    comp = get_competition(session, slug)
    r = rescore.start(session, comp, user, data.submission_ids, data.threshold, data.seeds)
    return rescore.report(session, comp, r)


@router.get("/{slug}/rescores", response_model=list[RescoreOut], responses=error_responses(401, 403, 404))
def list_rescores(slug: str, session: SessionDep, user: CurrentOrganizer):
    return rescore.list_for(session, get_competition(session, slug), user)


@router.get("/{slug}/rescores/{rescore_id}", response_model=RescoreOut,
            responses=error_responses(401, 403, 404, 422))
def get_rescore(slug: str, rescore_id: RescoreId, session: SessionDep, user: CurrentOrganizer):
    return rescore.get(session, get_competition(session, slug), user, rescore_id)
