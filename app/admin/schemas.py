from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.auth.models import Role
from app.names import Name


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    role: Role = Role.organizer


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    token: str = Field(description="Bearer token; shown only once.")


class WorkerOut(BaseModel):
    hostname: str
    queues: list[str]
    device_name: str | None
    state: Literal["busy", "idle", "offline"]
    current_run_id: int | None
    started_at: datetime
    last_seen: datetime
    problem: str | None = Field(description="Why this worker refuses work, in words (null: it doesn't). For "
                                            "example a message from another deployment: the worker was "
                                            "pointed at the wrong database, or shares another deployment's "
                                            "broker.")


class QueueOut(BaseModel):
    queue: str
    queued_runs: int
    running_runs: int
    broker_messages: int | None = Field(description="Messages waiting in the broker (null: it can't say).")


class FleetOut(BaseModel):
    workers: list[WorkerOut]
    queues: list[QueueOut]
