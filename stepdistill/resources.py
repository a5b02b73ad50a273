"""Where packaged data lives: embedded teachers and feature network, recipes, the pipeline file.

Every lookup goes through here. ``STEPDISTILL_ASSETS`` and ``STEPDISTILL_RECIPES`` override the
assets and recipes folders; otherwise the data packages ``stepdistill._assets``,
``stepdistill._recipes`` and ``stepdistill._pipelines`` are used (pyproject.toml maps them from the
top-level ``assets/``, ``train/recipes/`` and ``pipelines/`` at build time, so a wheel carries them
and an editable install points at the checkout), falling back to those top-level folders when
stepdistill runs from a checkout on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def _packaged(package: str, checkout_folder: str) -> Path:
    """The folder of data package ``package`` (mapped from ``checkout_folder`` by pyproject.toml), else the checkout's.

    The data folders have no ``__init__.py``, so they are namespace packages: the folder is the
    first real directory among the locations of the package's import spec (the site-packages copy
    of a wheel, or the checkout folder an editable install maps it to). Not
    ``importlib.resources.files``: under setuptools' editable finder it raises NotADirectoryError
    for namespace packages, and elsewhere it gives a MultiplexedPath rather than a Path.
    """
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or ()) if spec else ():
        if Path(location).is_dir():
            return Path(location)
    return _CHECKOUT / checkout_folder  # a plain checkout on PYTHONPATH: the package exists only once built


def assets_dir() -> Path:
    """Embedded teachers and the digits feature network: $STEPDISTILL_ASSETS, else the packaged copy."""
    env = os.environ.get("STEPDISTILL_ASSETS")
    return Path(env) if env else _packaged("stepdistill._assets", "assets")


def recipes_dir() -> Path:
    """Shipped recipes (``<teacher>/<objective>.yaml``): $STEPDISTILL_RECIPES, else the packaged copy."""
    env = os.environ.get("STEPDISTILL_RECIPES")
    return Path(env) if env else _packaged("stepdistill._recipes", "train/recipes")


def pipeline_file(name: str = "pipeline_stepdistill_class_conditional.py") -> Path:
    """A diffusers pipeline file from ``pipelines/`` (exported folders carry a copy)."""
    return _packaged("stepdistill._pipelines", "pipelines") / name
