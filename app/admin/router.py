from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from app.admin.service import fleet
from app.auth.dependencies import CurrentAdmin, SessionDep
from app.auth.models import Role
from app.auth.service import create_user

router = APIRouter(prefix="/api/admin", tags=["admin"])


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    role: Role = Role.organizer


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    token: str = Field(description="Bearer token; shown only once.")


@router.post("/users", response_model=UserCreated, status_code=status.HTTP_201_CREATED)
def add_user(data: UserCreate, session: SessionDep, _admin: CurrentAdmin):
    user, token = create_user(session, data.name, data.role)
    return UserCreated(id=user.id, name=user.name, role=user.role, token=token)


@router.get("/workers")
def workers(session: SessionDep, _admin: CurrentAdmin) -> dict:
    """The worker fleet (hostname, queues, device, busy/idle/offline) and queue depths."""
    return fleet(session)
