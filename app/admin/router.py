from __future__ import annotations

from fastapi import APIRouter, status

from app.admin.schemas import FleetOut, UserCreate, UserCreated
from app.admin.service import fleet
from app.auth.dependencies import CurrentAdmin, SessionDep
from app.auth.service import create_user
from app.http import BODY_ERRORS, error_responses

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.post("/users", response_model=UserCreated, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, *BODY_ERRORS))
def add_user(data: UserCreate, session: SessionDep, _admin: CurrentAdmin):
    user, token = create_user(session, data.name, data.role)
    return UserCreated(id=user.id, name=user.name, role=user.role, token=token)


@router.get("/workers", response_model=FleetOut, responses=error_responses(401, 403))
def workers(session: SessionDep, _admin: CurrentAdmin) -> dict:
    """The worker fleet (hostname, queues, device, busy/idle/offline) and queue depths."""
    return fleet(session)
