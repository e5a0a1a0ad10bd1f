"""The admin page: the worker fleet by hardware class, queue depth per class with the oldest waiting run, and
runs whose heartbeat went stale. Live: admin.js polls /admin/live.json (the same fleet, and its tables as
the page renders them). Admins only: anyone else gets the 403 page (live.json: a 403 answer), someone signed
out is sent to /login first (live.json: 401)."""

from __future__ import annotations

from itertools import groupby
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from app.admin.schemas import FleetOut, WorkerOut
from app.admin.service import fleet
from app.auth.dependencies import SessionDep
from app.auth.models import Role, User
from app.errors import Forbidden
from app.pages.dependencies import SignedIn
from app.pages.templating import PageRoute, fragment, render

router = APIRouter(include_in_schema=False, route_class=PageRoute)


def page_admin(user: SignedIn) -> User:
    if user.role != Role.admin:
        raise Forbidden("the admin page is for admins")
    return user


PageAdmin = Annotated[User, Depends(page_admin)]


def _by_class(workers: list[WorkerOut]) -> list[tuple[str, list[WorkerOut]]]:
    """Workers grouped by the hardware class they serve (those that report none last, under their queues)."""
    def cls(w: WorkerOut) -> tuple[bool, str]:
        return w.hardware_class is None, w.hardware_class or ",".join(w.queues)

    ordered = sorted(workers, key=lambda w: (cls(w), w.hostname))
    return [(name or "(no class)", list(group)) for (_, name), group in groupby(ordered, key=cls)]


def _tables(f: FleetOut) -> str:
    return fragment("_admin_fleet.html", fleet=f, classes=_by_class(f.workers))


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, session: SessionDep, user: PageAdmin):
    f = FleetOut.model_validate(fleet(session))
    return render(request, "admin.html", tables=_tables(f))


@router.get("/admin/live.json")
def admin_live(session: SessionDep, user: PageAdmin):
    """The fleet as GET /api/admin/workers answers it, and the page's tables rendered from it."""
    f = FleetOut.model_validate(fleet(session))
    return JSONResponse({"fleet": f.model_dump(mode="json"), "html": _tables(f)})
