"""Imports every built-in objective so its ``@register`` line runs."""

from . import dmd  # noqa: F401
from . import lcm  # noqa: F401
from . import scm  # noqa: F401
from . import ladd  # noqa: F401
from . import compose  # noqa: F401
from . import dmd2  # noqa: F401
from . import vsd  # noqa: F401
from . import sid  # noqa: F401
