from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.dependencies import CurrentOrganizer, SessionDep
from app.auth.service import user_for_token
from app.competitions import service
from app.competitions.schemas import CompetitionCreate, CompetitionOut, JoinOut, JoinRequest
from app.errors import Unauthorized
from app.http import BODY_ERRORS, error_responses
from app.ratelimit import JoinLimit

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
