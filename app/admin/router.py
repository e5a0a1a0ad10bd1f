from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from app.admin.service import fleet
from app.auth.dependencies import CurrentAdmin, SessionDep
from app.auth.models import Role
from app.auth.service import create_user
from app.http import BODY_ERRORS, error_responses
from app.names import Name

router = APIRouter(prefix="/api/admin", tags=["admin"])


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    role: Role = Role.organizer


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    token: str = Field(description="Bearer token; shown only once.")


@router.post("/users", response_model=UserCreated, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, *BODY_ERRORS))
def add_user(data: UserCreate, session: SessionDep, _admin: CurrentAdmin):
    user, token = create_user(session, data.name, data.role)
    return UserCreated(id=user.id, name=user.name, role=user.role, token=token)


class WorkerOut(BaseModel):
    hostname: str
    queues: list[str]
    device_name: str | None
    state: Literal["busy", "idle", "offline"]
    current_run_id: int | None
    started_at: datetime
    last_seen: datetime


class QueueOut(BaseModel):
    queue: str
    queued_runs: int
    running_runs: int
    broker_messages: int | None = Field(description="Messages waiting in the broker (null: it can't say).")


class FleetOut(BaseModel):
    workers: list[WorkerOut]
    queues: list[QueueOut]


@router.get("/workers", response_model=FleetOut, responses=error_responses(401, 403))
def workers(session: SessionDep, _admin: CurrentAdmin) -> dict:
    """The worker fleet (hostname, queues, device, busy/idle/offline) and queue depths."""
    return fleet(session)
