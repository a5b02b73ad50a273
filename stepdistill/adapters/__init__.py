"""Adapters: wrap any diffusers model as a ``Denoiser`` (x_t, t, cond) -> x0_hat.

Everything model-specific lives here: the family records (``families/``: how each family is
called, conditioned, decoded and exported), and the conversions from its output (epsilon, v,
flow velocity or sample) to an x0 estimate, in fp32.
"""

from .convert import PREDICTION_TYPES, prediction_to_x0, x0_to_prediction
from .denoiser import DiffusersDenoiser, family_of, wrap
from .families import Family, families, family_for_folder, family_for_model, get_family, register_family

__all__ = [
    "PREDICTION_TYPES",
    "prediction_to_x0",
    "x0_to_prediction",
    "DiffusersDenoiser",
    "family_of",
    "wrap",
    "Family",
    "families",
    "family_for_folder",
    "family_for_model",
    "get_family",
    "register_family",
]
