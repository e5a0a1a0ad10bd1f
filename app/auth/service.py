from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.models import Role, User


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "hpa_" + secrets.token_urlsafe(32)


def create_user(session: Session, name: str, role: Role) -> tuple[User, str]:
    """Create a user and return it with its bearer token (the only time the token is visible)."""
    token = new_token()
    user = User(name=name, role=role, token_hash=hash_token(token))
    session.add(user)
    session.flush()
    return user, token


def user_for_token(session: Session, token: str) -> User | None:
    return session.scalar(select(User).where(User.token_hash == hash_token(token)))


BOOTSTRAP_ADMIN = "bootstrap-admin"


def ensure_admin(session: Session, token: str) -> User:
    """The one bootstrap admin, keyed to HPARENA_ADMIN_TOKEN: rotating the setting revokes the old token."""
    user = session.scalar(select(User).where(User.name == BOOTSTRAP_ADMIN, User.role == Role.admin))
    if user is None:
        user = User(name=BOOTSTRAP_ADMIN, role=Role.admin, token_hash=hash_token(token))
        session.add(user)
    else:
        user.token_hash = hash_token(token)
    session.flush()
    return user
