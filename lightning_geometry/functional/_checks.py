"""Argument checks shared by the functional core: each raises ``ValueError`` naming the argument and value."""

from __future__ import annotations

import math
from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an ``int`` (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
