"""The caller's own account: who the token belongs to, and rotating or revoking that token."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from app.auth.dependencies import CurrentUser, SessionDep
from app.auth.schemas import MeOut, TokenOut
from app.auth.service import revoke_token, rotate_token
from app.http import error_responses

router = APIRouter(prefix="/api/me", tags=["account"])


@router.get("", response_model=MeOut, responses=error_responses(401))
def me(user: CurrentUser):
    return MeOut(id=user.id, name=user.name, role=user.role)


@router.post("/token", response_model=TokenOut, responses=error_responses(401))
def rotate_my_token(session: SessionDep, user: CurrentUser):
    """A new token for your account (for example after it leaked); the one you called with stops working."""
    return TokenOut(token=rotate_token(session, user, user))


@router.delete("/token", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401))
def revoke_my_token(session: SessionDep, user: CurrentUser) -> Response:
    """Revoke your token. Nothing else is lost; an admin can issue you a new one."""
    revoke_token(session, user, user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
