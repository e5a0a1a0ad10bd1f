from __future__ import annotations

import re
import secrets

from sqlalchemy import false, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import Role, User
from app.auth.service import create_user
from app.competitions.models import Competition, Membership, Team
from app.competitions.schemas import SLUG, CompetitionCreate, CompetitionRules, FinalEntriesOut, order_problem
from app.db import utcnow
from app.errors import Conflict, Forbidden, InvalidField, NotFound
from app.hardware import require_class
from app.leaderboard import board
from app.leaderboard.service import final_entries as final_entries_of
from app.names import name_key
from app.submissions.models import RunStatus, Submission
from app.submissions.service import create_submission
from worker.engine.config import TrainConfig

# The baseline team's name_key: app.names refuses control characters in every name a participant gives, so
# no participant's team can be called this, collide with it, or join it.
BASELINE_KEY = "\x01baseline"
# What a final entry may be: still training, or done well (failed, diverged and cancelled ones never score).
FINAL_STATUSES = (RunStatus.queued, RunStatus.running, RunStatus.succeeded)


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
        freeze_at=data.freeze_at,
        final_entries=data.final_entries,
        reveal_configs=data.reveal_configs,
        board_view=data.board_view,
        created_by_id=creator.id if creator else None,
    )
    session.add(comp)
    session.flush()
    record(session, creator, "competition.create", f"competition:{comp.slug}", title=comp.title,
           hardware_class=comp.hardware_class, seeds=comp.seeds)
    return comp


def is_manager(comp: Competition, user: User | None) -> bool:
    """The competition's own organizer (its creator, still an organizer) or an admin."""
    return user is not None and (user.role == Role.admin or
                                 user.role == Role.organizer and comp.created_by_id == user.id)


def require_manager(comp: Competition, user: User) -> None:
    """Only the competition's manager (is_manager) may change its rules or act as its organizer."""
    if not is_manager(comp, user):
        raise Forbidden(f"only the organizer of competition {comp.slug!r} or an admin may do this")


def change_rules(session: Session, comp: Competition, data: CompetitionRules, user: User) -> Competition:
    """Apply the fields sent (the caller is its manager: require_manager). The times must stay in order
    against the stored ones: starts_at < freeze_at < deadline, each where set (else InvalidField at the field
    sent that breaks it)."""
    changes = data.changes()
    times = {k: changes.get(k, getattr(comp, k)) for k in ("starts_at", "freeze_at", "deadline")}
    sent_times = [k for k in ("deadline", "freeze_at") if k in changes]
    if sent_times and (problem := order_problem(**times)) is not None:
        field, why = problem
        # Blame a field that was sent: with freeze_at stored and a new, earlier deadline, it is the deadline.
        if field not in changes:
            field = sent_times[0]
        stored = ", ".join(f"{k} {v.isoformat()}" for k, v in times.items() if v is not None and k not in changes)
        raise InvalidField(field, changes[field], why + (f" (stored: {stored})" if stored else ""),
                           ["starts_at < freeze_at < deadline"])
    for name, value in changes.items():
        setattr(comp, name, value)
    session.flush()
    record(session, user, "competition.rules", f"competition:{comp.slug}",
           **data.model_dump(mode="json", include=set(changes)))
    board.bump(session, comp.id)
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


# ----------------------------------------------------------------------------------------------------
# Final entries
# ----------------------------------------------------------------------------------------------------


def final_entries(session: Session, comp: Competition, team_id: int) -> FinalEntriesOut:
    """The team's marked final entries, and what the private board judges it on (leaderboard.service.
    final_entries): its marks that succeeded, or when none did its best public entry. Never chosen by a
    private score."""
    chosen = list(session.scalars(select(Submission.id).where(
        Submission.team_id == team_id, Submission.competition_id == comp.id, Submission.final.is_(true()))
        .order_by(Submission.id)))
    effective = sorted(session.scalars(select(final_entries_of(comp, team_id).subquery().c.submission_id)))
    default_used = not set(effective) & set(chosen)
    return FinalEntriesOut(limit=comp.final_entries, chosen=chosen, effective=effective, default_used=default_used,
                           locked=board.phase(comp) == "closed")


def set_final_entries(session: Session, comp: Competition, member: Membership, user: User,
                      submission_ids: list[int]) -> FinalEntriesOut:
    """Replace the team's final entries with `submission_ids` (distinct: the schema checks), before the
    deadline (else Conflict). Each must be the team's own, non-baseline, queued, running or succeeded
    submission in this competition, and there may be at most comp.final_entries (else InvalidField)."""
    if board.phase(comp) == "closed":  # final entries are locked with the deadline
        raise Conflict(f"final entries are locked since {comp.deadline.isoformat()}")
    if len(submission_ids) > comp.final_entries:
        raise InvalidField("submission_ids", submission_ids,
                           f"at most {comp.final_entries} final entries in this competition, got "
                           f"{len(submission_ids)}", [f"at most {comp.final_entries} ids"])
    # Serialises the team's concurrent choices (PostgreSQL), so two PUTs can't leave a mix of both: the team's
    # submission rows, in id order, and not the team's row, which a claim locks after a submission's (a
    # running cap): taken in the other order the two could deadlock.
    of_team = (Submission.team_id == member.team_id) & (Submission.competition_id == comp.id)
    session.execute(select(Submission.id).where(of_team).order_by(Submission.id).with_for_update())
    found = {row.id: row.status for row in session.execute(select(Submission.id, Submission.status).where(
        Submission.id.in_(submission_ids), Submission.team_id == member.team_id,
        Submission.competition_id == comp.id, Submission.is_baseline.is_(false())))}
    # Another team's submission reads as one that does not exist: nothing here says which ids are taken.
    missing = [i for i in submission_ids if i not in found]
    if missing:
        raise InvalidField("submission_ids", missing, f"not your team's submissions in {comp.slug!r}: "
                           f"{', '.join(map(str, missing))}", ["your team's submission ids"])
    unusable = {i: s for i, s in found.items() if s not in FINAL_STATUSES}
    if unusable:
        raise InvalidField("submission_ids", list(unusable), "a final entry must be queued, running or succeeded: "
                           + ", ".join(f"{i} is {s}" for i, s in unusable.items()), list(FINAL_STATUSES))
    now = utcnow()
    session.execute(update(Submission).where(of_team, Submission.final.is_(true()),
                                             Submission.id.not_in(submission_ids))
                    .values(final=False, final_at=None).execution_options(synchronize_session="fetch"))
    if submission_ids:  # newly marked ones: the ones already final keep the time they were marked
        session.execute(update(Submission).where(of_team, Submission.id.in_(submission_ids),
                                                 Submission.final.is_(false()))
                        .values(final=True, final_at=now).execution_options(synchronize_session="fetch"))
    session.flush()
    record(session, user, "final_entries.set", f"competition:{comp.slug}", team_id=member.team_id,
           submission_ids=sorted(submission_ids))
    board.bump(session, comp.id)
    return final_entries(session, comp, member.team_id)


# ----------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------


def baseline_team(session: Session, comp: Competition) -> Team:
    """The competition's baseline team, made at its first baseline: it holds the organizers' reference
    entries, has no members, and is never ranked."""
    q = select(Team).where(Team.competition_id == comp.id, Team.name_key == BASELINE_KEY)
    team = session.scalar(q)
    if team is not None:
        return team
    try:
        with session.begin_nested():  # a concurrent first baseline may insert it at the same moment
            team = Team(competition_id=comp.id, name="Baseline", name_key=BASELINE_KEY,
                        invite_code=secrets.token_urlsafe(24))
            session.add(team)
    except IntegrityError:
        return session.scalars(q).one()
    return team


def submit_baseline(session: Session, comp: Competition, user: User, cfg: TrainConfig) -> Submission:
    """An organizer's reference entry (the caller is the competition's manager: require_manager), in the
    competition's baseline team."""
    sub, _ = create_submission(session, comp, None, user, cfg, baseline_team=baseline_team(session, comp))
    record(session, user, "baseline.submit", f"competition:{comp.slug}", submission_id=sub.id)
    return sub
