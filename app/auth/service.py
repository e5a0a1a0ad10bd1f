from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import Role, User
from app.errors import NotFound


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "hpa_" + secrets.token_urlsafe(32)


def create_user(session: Session, name: str, role: Role, actor: User | None = None) -> tuple[User, str]:
    """Create a user and return it with its bearer token (the only time the token is visible). An admin
    creating an account (`actor`) is audited; a participant joining a competition is not an admin action."""
    token = new_token()
    user = User(name=name, role=role, token_hash=hash_token(token))
    session.add(user)
    session.flush()
    if actor is not None:
        record(session, actor, "user.create", f"user:{user.id}", name=name, role=role)
    return user, token


def user_for_token(session: Session, token: str) -> User | None:
    return session.scalar(select(User).where(User.token_hash == hash_token(token)))


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    return user


def rotate_token(session: Session, user: User, actor: User) -> str:
    """A new token for `user`; the old one stops working at once. Returns the new token (shown once)."""
    token = new_token()
    user.token_hash = hash_token(token)
    record(session, actor, "token.rotate", f"user:{user.id}", user=user.name)
    session.flush()
    return token


def revoke_token(session: Session, user: User, actor: User) -> None:
    """The token stops working; the account stays (its submissions and team seat are kept) until its owner
    is given a new token by an admin."""
    user.token_hash = None
    record(session, actor, "token.revoke", f"user:{user.id}", user=user.name)
    session.flush()


BOOTSTRAP_ADMIN = "bootstrap-admin"


def ensure_admin(session: Session, token: str) -> User:
    """The one bootstrap admin, keyed to HPARENA_ADMIN_TOKEN at every start: rotating the setting revokes the
    old token, and a start restores the setting's token even if it was revoked through the API."""
    user = session.scalar(select(User).where(User.name == BOOTSTRAP_ADMIN, User.role == Role.admin))
    if user is None:
        user = User(name=BOOTSTRAP_ADMIN, role=Role.admin, token_hash=hash_token(token))
        session.add(user)
    else:
        user.token_hash = hash_token(token)
    session.flush()
    return user
