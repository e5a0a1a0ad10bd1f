"""The insights page: accuracy against GPU-hours with the Pareto front, accuracy against each hyperparameter,
and Optuna's hyperparameter importance (app.leaderboard.insights computes them and decides who sees what).

For the competition's organizers and admins during the contest, for everyone after the close; anyone else
gets the 403 page, and someone signed out is sent to /login first (they may be its organizer)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.auth.dependencies import SessionDep
from app.competitions.service import get_competition
from app.leaderboard.insights import insights
from app.pages.dependencies import PageUser
from app.pages.templating import PageRoute, render

router = APIRouter(include_in_schema=False, route_class=PageRoute)


@router.get("/competitions/{slug}/insights", response_class=HTMLResponse)
def insights_page(request: Request, slug: str, session: SessionDep, user: PageUser):
    page = insights(session, get_competition(session, slug), user)
    return render(request, "insights.html", page=page, data=page.chart_data())
