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


# ------------------------------------------------------------------ argparse types (the CLI's half)
# argparse turns an ArgumentTypeError into its one-line usage error (exit 2), so a bad flag never
# reaches the work: ``type=positive_int`` and so on on every numeric flag.


def _int_arg(text: str, low: int, high: int | None, what: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_arg(text, 1, None, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_arg(text, 0, None, "an integer >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**32)."""
    return _int_arg(text, 0, 2**32, "a seed in [0, 2**32)")


def finite_float(text: str) -> float:
    """argparse type: a finite float (no nan / inf)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device string (cpu, cuda, cuda:1, mps, ...)."""
    import argparse

    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    return text


__all__ = ["check_choice", "check_finite", "check_range", "device_name", "finite_float", "nonneg_int", "positive_int",
           "seed_int"]
