"""Adapters: wrap any diffusers model as a ``Denoiser`` (x_t, t, cond) -> x0_hat.

Everything model-specific lives here: how each family is called (class labels, prompt
embeddings, pooled projections), which native timestep it expects, and how its output
(epsilon, v, flow velocity or sample) becomes an x0 estimate. Conversions run in fp32.
"""

from .convert import PREDICTION_TYPES, prediction_to_x0, x0_to_prediction
from .diffusers_models import FAMILIES, DiffusersDenoiser, family_of, wrap

__all__ = [
    "PREDICTION_TYPES",
    "prediction_to_x0",
    "x0_to_prediction",
    "FAMILIES",
    "DiffusersDenoiser",
    "family_of",
    "wrap",
]
