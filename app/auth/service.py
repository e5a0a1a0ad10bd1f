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


def ensure_admin(session: Session, token: str) -> User:
    """The bootstrap admin from HPARENA_ADMIN_TOKEN, created on first start."""
    user = user_for_token(session, token)
    if user is None:
        user = User(name="admin", role=Role.admin, token_hash=hash_token(token))
        session.add(user)
        session.flush()
    return user
