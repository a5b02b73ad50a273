"""Imports every built-in objective so its ``@register`` line runs."""

from . import dmd  # noqa: F401
