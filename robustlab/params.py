"""JSON parameters of attacks and training recipes: one coercion rule for both."""

from __future__ import annotations

import math
from typing import Any

from robustlab.errors import RobustlabError


def coerce_param(owner: str, key: str, value: Any, default: Any, lower: bool = False) -> Any:
    """Give a parameter the type of its default: ints stay ints, "true" becomes True, a ``None``
    default takes a number or a string. ``owner`` names the thing in errors (``attack 'pgd'``);
    ``lower`` lower-cases a string (for parameters with a fixed set of choices)."""
    bad = RobustlabError(f"{owner}: {key}={value!r} should be like {default!r}")
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise bad
        return int(value)
    if isinstance(default, float) or default is None:
        if default is None and isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value.lower() if lower else value
    return value
