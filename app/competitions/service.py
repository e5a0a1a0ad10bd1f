from __future__ import annotations

import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import Role, User
from app.auth.service import create_user
from app.competitions.models import Competition, Membership, Team
from app.competitions.schemas import SLUG, CompetitionCreate
from app.errors import Conflict, Forbidden, NotFound
from app.hardware import require_class
from app.names import name_key


def get_competition(session: Session, slug: str) -> Competition:
    # A string no slug can match (a NUL byte, say, which PostgreSQL refuses in a query) is simply not found.
    comp = session.scalar(select(Competition).where(Competition.slug == slug)) if re.fullmatch(SLUG, slug) else None
    if comp is None:
        raise NotFound(f"no competition {slug!r}")
    return comp


def list_competitions(session: Session) -> list[Competition]:
    """Every competition, newest first."""
    return list(session.scalars(select(Competition).order_by(Competition.created_at.desc())))


def create_competition(session: Session, data: CompetitionCreate, creator: User | None) -> Competition:
    if session.scalar(select(Competition.id).where(Competition.slug == data.slug)) is not None:
        raise Conflict(f"competition {data.slug!r} already exists")
    require_class(session, data.hardware_class)
    comp = Competition(
        slug=data.slug,
        title=data.title,
        dataset=data.dataset,
        model=data.model,
        budget=data.budget,
        hardware_class=data.hardware_class,
        search_space={k: v.model_dump(exclude_none=True) for k, v in data.search_space.items()},
        submission_quota=data.submission_quota,
        quota_window_hours=data.quota_window_hours,
        starts_at=data.starts_at,
        deadline=data.deadline,
        seeds=data.seeds,
        deterministic=data.deterministic,
        gpu_hour_budget=data.gpu_hour_budget,
        max_running_per_team=data.max_running_per_team,
        created_by_id=creator.id if creator else None,
    )
    session.add(comp)
    session.flush()
    record(session, creator, "competition.create", f"competition:{comp.slug}", title=comp.title,
           hardware_class=comp.hardware_class, seeds=comp.seeds)
    return comp


def join(session: Session, comp: Competition, name: str, team_name: str, invite_code: str | None,
         user: User | None) -> tuple[User, Team, str | None]:
    """Put a participant (new, or the caller) into a team: a new team is created with a fresh invite
    code; an existing one needs that code."""
    if user is not None and session.scalar(select(Membership.id).where(Membership.user_id == user.id,
                                                                       Membership.competition_id == comp.id)):
        raise Conflict("you already joined this competition")
    key = name_key(team_name)
    team = session.scalar(select(Team).where(Team.competition_id == comp.id, Team.name_key == key))
    if team is None:
        team = Team(competition_id=comp.id, name=team_name, name_key=key, invite_code=secrets.token_urlsafe(12))
        session.add(team)
        session.flush()
    elif invite_code is None or not secrets.compare_digest(invite_code, team.invite_code):
        raise Forbidden(f"team {team.name!r} already exists: joining it needs its invite_code from a member")
    token = None
    if user is None:
        user, token = create_user(session, name, Role.participant)
    session.add(Membership(user_id=user.id, team_id=team.id, competition_id=comp.id))
    session.flush()
    return user, team, token


def membership(session: Session, comp: Competition, user: User) -> Membership:
    m = session.scalar(select(Membership).where(Membership.user_id == user.id,
                                                Membership.competition_id == comp.id))
    if m is None:
        raise Forbidden(f"join competition {comp.slug!r} before submitting")
    return m
