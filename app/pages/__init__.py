"""Server-rendered pages (Jinja2) for people: the board to project in class, a team's submission, insights,
the admin's fleet. Every asset is served from app/pages/static; the JSON API stays under /api."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC_DIR = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    from app.pages.admin import router as admin_pages
    from app.pages.insights import router as insights_pages
    from app.pages.router import router as pages
    from app.pages.templating import http_error_page

    for r in (pages, insights_pages, admin_pages):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # A browser that follows a dead link gets a page, not JSON; the API and every non-browser client still
    # get FastAPI's JSON answer (templating.wants_html).
    app.add_exception_handler(StarletteHTTPException, http_error_page)
