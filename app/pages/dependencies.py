"""Who is looking at a page: the same bearer tokens as the API, pasted once at /login and kept in a cookie.

The cookie is HttpOnly (page scripts never see the token) and SameSite=Lax, and pages only read with it:
every change still goes through the JSON API with an Authorization header, so the cookie cannot be used to
act on someone's behalf from another site.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Cookie, Depends

from app.auth.dependencies import SessionDep
from app.auth.models import User
from app.auth.service import user_for_token

COOKIE = "hparena_token"


def page_user(session: SessionDep, hparena_token: Annotated[str | None, Cookie()] = None) -> User | None:
    """The signed-in user, or None (no cookie, or a token since revoked: the page shows the anonymous view
    and offers /login)."""
    if not hparena_token:
        return None
    return user_for_token(session, hparena_token)


PageUser = Annotated[User | None, Depends(page_user)]
