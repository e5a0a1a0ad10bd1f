from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.admin.schemas import FleetOut, HardwareClassIn, HardwareClassOut, UserCreate, UserCreated
from app.admin.service import fleet, hardware_classes, put_hardware_class
from app.audit import service as audit
from app.audit.schemas import AuditEventOut
from app.auth.dependencies import CurrentAdmin, CurrentOrganizer, SessionDep
from app.auth.schemas import TokenOut
from app.auth.service import create_user, get_user, revoke_token, rotate_token
from app.hardware import CLASS_NAME
from app.http import BODY_ERRORS, error_responses

router = APIRouter(prefix="/api/admin", tags=["admin"])
UserId = Annotated[int, Path(ge=1, le=2**31 - 1)]
ClassName = Annotated[str, Path(pattern=CLASS_NAME, description="The class's name; its queue is train.<name>.")]


@router.post("/users", response_model=UserCreated, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, *BODY_ERRORS))
def add_user(data: UserCreate, session: SessionDep, _admin: CurrentAdmin):
    user, token = create_user(session, data.name, data.role, actor=_admin)
    return UserCreated(id=user.id, name=user.name, role=user.role, token=token)


@router.get("/workers", response_model=FleetOut, responses=error_responses(401, 403))
def workers(session: SessionDep, _admin: CurrentAdmin) -> dict:
    """The worker fleet (hostname, queues, device, busy/idle/offline, current run, heartbeat age), queue depths
    with each queue's oldest waiting run, and the running runs whose heartbeat is stale."""
    return fleet(session)


@router.get("/hardware-classes", response_model=list[HardwareClassOut], responses=error_responses(401, 403))
def list_hardware_classes(session: SessionDep, _organizer: CurrentOrganizer):
    """The hardware classes a competition may name (organizers pick one; admins define them)."""
    return hardware_classes(session)


@router.put("/hardware-classes/{name}", response_model=HardwareClassOut, responses={
    **error_responses(401, 403, *BODY_ERRORS), 201: {"model": HardwareClassOut, "description": "Created"}})
def put_class(name: ClassName, data: HardwareClassIn, session: SessionDep, admin: CurrentAdmin,
              response: Response):
    """Define a hardware class, or replace its definition (201 when new, 200 when replaced). A worker
    serving it checks its device against it at start-up and refuses to consume on a mismatch; every run
    finished afterwards is checked against it too, and the board flags a mismatch."""
    cls, created = put_hardware_class(session, name, data, admin)
    if created:
        response.status_code = status.HTTP_201_CREATED
    return cls


@router.post("/users/{user_id}/token", response_model=TokenOut, responses=error_responses(401, 403, 404, 422))
def rotate_user_token(user_id: UserId, session: SessionDep, admin: CurrentAdmin):
    """Issue a new token for any account (also to restore a revoked one); the old token stops working."""
    return TokenOut(token=rotate_token(session, get_user(session, user_id), admin))


@router.delete("/users/{user_id}/token", status_code=status.HTTP_204_NO_CONTENT,
               responses=error_responses(401, 403, 404, 422))
def revoke_user_token(user_id: UserId, session: SessionDep, admin: CurrentAdmin) -> Response:
    """Revoke an account's token: it can't sign in until an admin issues a new one."""
    revoke_token(session, get_user(session, user_id), admin)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/audit", response_model=list[AuditEventOut], responses=error_responses(401, 403, 422))
def audit_log(session: SessionDep, _admin: CurrentAdmin, limit: Annotated[int, Query(ge=1, le=500)] = 100,
              before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None):
    """Admin and organizer actions and token changes, newest first; page back with `before_id`."""
    return audit.recent(session, limit, before_id)
