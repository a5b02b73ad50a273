"""Where packaged data lives: embedded teachers and feature network, recipes, the pipeline file.

Every lookup goes through here. ``STEPDISTILL_ASSETS`` and ``STEPDISTILL_RECIPES`` override the
assets and recipes folders. Otherwise, when this module runs from a source checkout (a
``pyproject.toml`` beside ``stepdistill/``: PYTHONPATH or an editable install), the checkout's own
top-level ``assets/``, ``train/recipes/`` and ``pipelines/`` are used; an installed wheel carries
them as the data packages ``stepdistill._assets``, ``stepdistill._recipes`` and
``stepdistill._pipelines`` (pyproject.toml maps the folders into the package at build time).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def _packaged(package: str, checkout_folder: str) -> Path:
    """The checkout's ``checkout_folder`` when running from a checkout, else the data package's folder.

    The checkout comes first so that a worktree on PYTHONPATH reads its own files, not those of
    another checkout installed editable in the same venv. The data folders have no ``__init__.py``:
    they are namespace packages, whose folder is the first real directory among the locations of
    their import spec (not ``importlib.resources.files``, which gives a MultiplexedPath for them).
    """
    local = _CHECKOUT / checkout_folder
    if (_CHECKOUT / "pyproject.toml").is_file() and local.is_dir():
        return local
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or ()) if spec else ():
        if Path(location).is_dir():
            return Path(location)
    return local  # not found anywhere: callers report the missing folder by this path


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
