"""Where packaged data lives: embedded teachers and feature network, recipes, the pipeline file.

Every lookup goes through here. ``STEPDISTILL_ASSETS`` and ``STEPDISTILL_RECIPES`` override the
assets and recipes folders; otherwise the copies inside the installed package are used (a wheel
carries them), falling back to the top-level folders of a source checkout.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def _packaged(package: str, checkout_folder: str) -> Path:
    try:
        path = Path(str(resources.files(package)))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return _CHECKOUT / checkout_folder


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
