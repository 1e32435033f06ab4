"""Argument checks shared by the modules that validate what users pass."""
from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(value: Any, minimum: int, what: str) -> int:
    """``value`` if it is an int >= ``minimum``; otherwise ``ValueError("<what> must be an int
    >= <minimum>, got <value>")``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value
