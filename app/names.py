"""Names people see on the board: NFKC-normalised, trimmed, and free of invisible characters.

A name made only of a right-to-left override and a zero-width space would show on the leaderboard as
nothing, and "ＯＷＬＳ" or "owls " would pass for another team called "owls". So every display name is
NFKC-normalised and trimmed; control and format characters (Unicode categories Cc, Cf: bidi overrides,
zero-width joiners, NUL) and unassigned or private-use code points are refused; and team names compare
by `name_key`, the case-folded form.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

REFUSED_CATEGORIES = {"Cc": "control", "Cf": "format", "Cs": "surrogate", "Co": "private-use", "Cn": "unassigned",
                      "Zl": "line separator", "Zp": "paragraph separator"}


def normalize_name(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # pydantic's own str check reports the wrong type
    text = unicodedata.normalize("NFKC", value).strip()
    for ch in text:
        category = unicodedata.category(ch)
        if category in REFUSED_CATEGORIES:
            raise ValueError(f"contains the invisible {REFUSED_CATEGORIES[category]} character "
                             f"U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')}); use visible characters only")
    return " ".join(text.split())  # runs of inner white space shown as one


def name_key(name: str) -> str:
    """What two names must differ in to be different teams: case-folded after normalising."""
    return unicodedata.normalize("NFKC", normalize_name(name).casefold())


# Lengths count characters after normalising.
Name = Annotated[str, BeforeValidator(normalize_name), Field(min_length=1, max_length=100)]
Title = Annotated[str, BeforeValidator(normalize_name), Field(min_length=1, max_length=200)]
