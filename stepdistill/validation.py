"""Value checks shared by the config layer and the objectives (one-line errors naming the key).

This module imports nothing of stepdistill but ``contract``, so objectives import it at module
top (``config`` imports the objective registry; importing ``config`` from an objective would
close a circle).
"""

from __future__ import annotations

import math

from .contract import StepdistillError


def check_choice(name: str, value, choices) -> None:
    """One-line error when a setting is not one of ``choices``."""
    if value not in choices:
        raise StepdistillError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_finite(name: str, value) -> None:
    """One-line error for NaN or infinity (numbers, or any number inside a list/tuple)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            check_finite(name, v)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise StepdistillError(f"{name} = {value} is not a finite number")


def check_range(name: str, value, low=None, high=None, *, high_open: bool = False) -> None:
    """One-line error when a numeric setting is NaN/inf or outside [low, high] (``[low, high)`` with ``high_open``)."""
    check_finite(name, value)
    if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}"
        raise StepdistillError(f"{name} = {value} is out of range {bounds}")


__all__ = ["check_choice", "check_finite", "check_range"]
