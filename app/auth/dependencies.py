"""Typed dependencies: a route's signature says who may call it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.models import Role, User
from app.auth.service import user_for_token
from app.db import get_session
from app.errors import Forbidden, Unauthorized

# scope="function": commit (and send queued Celery messages) before the response goes out. With the default
# "request" scope FastAPI commits after sending, so a client could act on a 201 whose row isn't committed yet,
# and a failed commit would follow a success response.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
_bearer = HTTPBearer(auto_error=False)


def current_user(session: SessionDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    if creds is None:
        raise Unauthorized("missing bearer token")
    user = user_for_token(session, creds.credentials)
    if user is None:
        raise Unauthorized("invalid token")
    return user


def optional_user(session: SessionDep,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User | None:
    """Who is asking, on a route anyone may read: None without a token; a wrong token is still a 401 (a typo
    must not silently show the anonymous view)."""
    return None if creds is None else current_user(session, creds)


def _require(*roles: Role):
    def check(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role not in roles:
            raise Forbidden(f"requires role: {' or '.join(roles)}")
        return user

    return check


CurrentUser = Annotated[User, Depends(current_user)]
OptionalUser = Annotated[User | None, Depends(optional_user)]
CurrentOrganizer = Annotated[User, Depends(_require(Role.organizer, Role.admin))]
CurrentAdmin = Annotated[User, Depends(_require(Role.admin))]
