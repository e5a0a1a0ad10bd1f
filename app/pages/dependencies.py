"""Who is looking at a page: the same bearer tokens as the API, pasted once at /login and kept in a cookie.

The cookie is HttpOnly (page scripts never see the token) and SameSite=Lax, and pages only read with it:
every change still goes through the JSON API with an Authorization header, so the cookie cannot be used to
act on someone's behalf from another site. Signing in and out are the only page forms, and they refuse a
post from another site (app.pages.templating.cross_site).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Cookie, Depends, Request

from app.auth.dependencies import SessionDep
from app.auth.models import User
from app.auth.service import user_for_token
from app.errors import Unauthorized

COOKIE = "hparena_token"
COOKIE_MAX_AGE = 30 * 24 * 3600  # a term's lab sessions without pasting the token again
MAX_TOKEN = 512  # far longer than any token we issue: longer cookie values are garbage, not a lookup


def page_user(request: Request, session: SessionDep,
              hparena_token: Annotated[str | None, Cookie()] = None) -> User | None:
    """The signed-in user, or None (no cookie, or a token since revoked: the page shows the anonymous view
    and offers /login). Kept on the request, so an error page rendered later still shows who is signed in."""
    user = None
    if hparena_token and len(hparena_token) <= MAX_TOKEN:
        user = user_for_token(session, hparena_token)
    request.state.page_user = user
    return user


def signed_in(user: Annotated[User | None, Depends(page_user)]) -> User:
    """A page only a signed-in user may see: signed out, a page route (templating.PageRoute) redirects to
    /login and back, and a page's JSON answers 401."""
    if user is None:
        raise Unauthorized("sign in at /login to see this page")
    return user


PageUser = Annotated[User | None, Depends(page_user)]
SignedIn = Annotated[User, Depends(signed_in)]
