"""The objective registry: one decorator line per objective; dotted paths also accepted."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from ..contract import StepdistillError

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: ``@register("dmd")``. Duplicate names are rejected."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise StepdistillError(f"objective name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not dataclasses.is_dataclass(cls):
            raise StepdistillError(f"objective {cls.__qualname__} must be a dataclass (its fields are its hyperparameters)")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def registered() -> dict[str, type]:
    """Registered objectives by name (built-ins imported on first use)."""
    from . import builtin  # noqa: F401  (registers the built-in objectives)

    return dict(_REGISTRY)


def get_objective_class(name: str) -> type:
    """Look up by registry name, or import ``package.module.ClassName``."""
    table = registered()
    if name in table:
        return table[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise StepdistillError(f"cannot import objective {name!r}: {e}") from None
        if not dataclasses.is_dataclass(cls) or not hasattr(cls, "loss"):
            raise StepdistillError(f"{name!r} is not an objective (a dataclass with a loss method)")
        return cls
    close = difflib.get_close_matches(name, table, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise StepdistillError(f"unknown objective {name!r}{hint}; registered: {', '.join(sorted(table))}")


def build_objective(name: str, **hyper: Any):
    """Instantiate an objective from its name and hyperparameters (validated by the config layer)."""
    return get_objective_class(name)(**hyper)
