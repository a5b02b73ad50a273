"""Imports every built-in objective so its ``@register`` line runs."""

from . import compose  # noqa: F401
from .adversarial import ladd  # noqa: F401
from .consistency import lcm, scm  # noqa: F401
from .score import dmd, dmd2, sid, vsd  # noqa: F401
