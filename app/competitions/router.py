from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import eta
from app.auth.dependencies import CurrentOrganizer, CurrentUser, SessionDep
from app.auth.service import user_for_token
from app.competitions import service
from app.competitions.schemas import (
    CompetitionCreate,
    CompetitionOut,
    CompetitionRules,
    FinalEntriesIn,
    FinalEntriesOut,
    JoinOut,
    JoinRequest,
)
from app.errors import Unauthorized
from app.http import BODY_ERRORS, error_responses
from app.ratelimit import JoinLimit
from app.submissions.schemas import SubmissionCreate, SubmissionOut

router = APIRouter(prefix="/api/competitions", tags=["competitions"])


@router.post("", response_model=CompetitionOut, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 409, *BODY_ERRORS))
def create_competition(data: CompetitionCreate, session: SessionDep, organizer: CurrentOrganizer):
    return service.create_competition(session, data, organizer)


@router.get("", response_model=list[CompetitionOut])
def list_competitions(session: SessionDep):
    return service.list_competitions(session)


@router.get("/{slug}", response_model=CompetitionOut, responses=error_responses(404))
def get_competition(slug: str, session: SessionDep):
    return service.get_competition(session, slug)


@router.patch("/{slug}", response_model=CompetitionOut, responses=error_responses(401, 403, 404, *BODY_ERRORS))
def change_rules(slug: str, data: CompetitionRules, session: SessionDep, organizer: CurrentOrganizer):
    """Change the contest's rules (its organizer or an admin). Only the fields sent change; the times must
    stay in order with the stored ones (starts_at < freeze_at < deadline), else 422 at the field."""
    comp = service.get_competition(session, slug)
    service.require_manager(comp, organizer)
    return service.change_rules(session, comp, data, organizer)


@router.get("/{slug}/final-entries", response_model=FinalEntriesOut, responses=error_responses(401, 403, 404))
def get_final_entries(slug: str, session: SessionDep, user: CurrentUser):
    """The caller's team's final entries, and what the private board will judge it on."""
    comp = service.get_competition(session, slug)
    return service.final_entries(session, comp, service.membership(session, comp, user).team_id)


@router.put("/{slug}/final-entries", response_model=FinalEntriesOut,
            responses=error_responses(401, 403, 404, 409, *BODY_ERRORS))
def set_final_entries(slug: str, data: FinalEntriesIn, session: SessionDep, user: CurrentUser):
    """Replace the caller's team's final entries (before the deadline, else 409)."""
    comp = service.get_competition(session, slug)
    member = service.membership(session, comp, user)
    return service.set_final_entries(session, comp, member, user, data.submission_ids)


@router.post("/{slug}/baselines", response_model=SubmissionOut, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 404, *BODY_ERRORS))
def submit_baseline(slug: str, data: SubmissionCreate, session: SessionDep, organizer: CurrentOrganizer):
    """Submit a reference entry (its organizer or an admin): trained like any submission, shown on both
    boards as a marked line, never ranked. It belongs to the competition's baseline team, not the caller's;
    no quota or GPU-hour budget applies."""
    comp = service.get_competition(session, slug)
    service.require_manager(comp, organizer)
    sub = service.submit_baseline(session, comp, organizer, data.config)
    return SubmissionOut.model_validate(sub).model_copy(update=eta.annotate(session, sub))


@router.post("/{slug}/join", response_model=JoinOut, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 404, 409, 429, *BODY_ERRORS))
def join_competition(
    slug: str,
    data: JoinRequest,
    _: JoinLimit,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
):
    """Join a team (created if new). Without a token a new participant is created and its token returned."""
    comp = service.get_competition(session, slug)
    caller = None
    if creds is not None:
        caller = user_for_token(session, creds.credentials)
        if caller is None:  # a typo'd token must not silently mint a second identity
            raise Unauthorized("invalid token")
    user, team, token = service.join(session, comp, data.name, data.team, data.invite_code, caller)
    return JoinOut(user_id=user.id, team_id=team.id, team=team.name, invite_code=team.invite_code, token=token)
