"""The core pages: sign in and out, the competitions, the board to project in class, a team's submission.

Each live page polls a GET JSON endpoint next to it (`board.json`, `live.json`) with the same cookie; both
answer from the same service call as the page, so the page and its updates show the same thing."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from app.auth.dependencies import SessionDep
from app.auth.service import user_for_token
from app.pages import service
from app.pages.dependencies import COOKIE, COOKIE_MAX_AGE, MAX_TOKEN, PageUser, SignedIn
from app.pages.templating import PageRoute, cross_site, error_page, fragment, render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

SubmissionId = Annotated[int, Path(ge=1, le=2**31 - 1)]
BoardName = Annotated[Literal["public", "private"] | None, Query(
    description="Default: the public board during the contest, the private board after the close.")]
ViewName = Annotated[Literal["accuracy", "efficiency"] | None, Query()]
Next = Annotated[str, Query(max_length=2000)]


# ----------------------------------------------------------------------------------------------------
# Signing in and out
# ----------------------------------------------------------------------------------------------------


async def _login_form(request: Request) -> dict[str, str]:
    """The login form's fields (application/x-www-form-urlencoded; anything else reads as empty). The app's
    body-size limit already bounds what is read."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    try:
        return dict(parse_qsl((await request.body()).decode("utf-8", "replace"), max_num_fields=8))
    except ValueError:
        return {}


LoginForm = Annotated[dict[str, str], Depends(_login_form)]


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, user: PageUser, next: Next = "/"):
    return render(request, "login.html", next=service.safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, session: SessionDep, form: LoginForm):
    """A token pasted once: kept in an HttpOnly cookie, then back to the page that asked (a local path only)."""
    token, target = form.get("token", "").strip(), service.safe_next(form.get("next"))
    if cross_site(request):
        return error_page(request, 403, "Sign in from this site's own sign-in page.")
    user = user_for_token(session, token) if token and len(token) <= MAX_TOKEN else None
    if user is None:
        error = "That token is not valid: paste the whole token you were given (it starts with hpa_)." if token \
            else "Paste your token to sign in."
        return render(request, "login.html", status_code=401, next=target, error=error)
    response = RedirectResponse(target, status_code=303)
    # Secure whenever the page came over HTTPS (behind a TLS proxy: uvicorn's --proxy-headers and
    # FORWARDED_ALLOW_IPS make X-Forwarded-Proto count), so plain-HTTP classroom installs still sign in.
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="lax",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request):
    if cross_site(request):
        return error_page(request, 403, "Sign out from this site's own pages.")
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=request.url.scheme == "https")
    return response


# ----------------------------------------------------------------------------------------------------
# Competitions and boards
# ----------------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def index(request: Request, session: SessionDep, user: PageUser):
    return render(request, "index.html", rows=service.competitions(session))


@router.get("/competitions/{slug}", response_class=HTMLResponse)
def board_page(request: Request, slug: str, session: SessionDep, user: PageUser, board: BoardName = None,
               view: ViewName = None):
    page = service.board_page(session, slug, user, board, view)
    return render(request, "board.html", page=page, b=page.board)


@router.get("/competitions/{slug}/board.json")
def board_json(slug: str, session: SessionDep, user: PageUser, board: BoardName = None, view: ViewName = None):
    """The board as GET /api/competitions/{slug}/leaderboard answers this viewer, and its rows as the page
    renders them."""
    page = service.board_page(session, slug, user, board, view)
    return JSONResponse({**service.board_json(page), "rows_html": fragment("_board_rows.html", page=page,
                                                                           b=page.board)})


# ----------------------------------------------------------------------------------------------------
# A submission
# ----------------------------------------------------------------------------------------------------


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def submission_page(request: Request, submission_id: SubmissionId, session: SessionDep, user: SignedIn):
    page = service.submission_page(session, user, submission_id)
    return render(request, "submission.html", page=page, d=page.detail, live=service.live_json(page))


@router.get("/submissions/{submission_id}/live.json")
def submission_live(submission_id: SubmissionId, session: SessionDep, user: SignedIn):
    page = service.submission_page(session, user, submission_id)
    return JSONResponse({**service.live_json(page),
                         "html": fragment("_submission_live.html", page=page, d=page.detail)})
