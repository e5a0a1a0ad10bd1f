"""Result hygiene shared by the engine, the worker and the CLI (torch-free)."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """NaN/inf become None (strict JSON has neither); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
