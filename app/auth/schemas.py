from __future__ import annotations

from pydantic import BaseModel, Field

from app.auth.models import Role


class MeOut(BaseModel):
    id: int
    name: str
    role: Role


class TokenOut(BaseModel):
    token: str = Field(description="The new bearer token; shown only once. The previous one no longer works.")
