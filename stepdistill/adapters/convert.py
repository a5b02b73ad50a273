"""Parameterisation conversions for x_t = a x0 + s noise (all in fp32).

| prediction   | network output                | x0 from output                    |
|--------------|-------------------------------|-----------------------------------|
| epsilon      | eps = noise                   | (x_t - s eps) / a                 |
| v_prediction | v = a noise - s x0            | (a x_t - s v) / (a^2 + s^2)       |
| flow         | u = noise - x0 (RF velocity)  | (x_t - s u) / (a + s)             |
| sample       | x0                            | x0                                |

The v and flow rows are exact for any (a, s), so they hold for VP, flow and trig schedules.
"""

from __future__ import annotations

from torch import Tensor

from ..contract import StepdistillError

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample")
_ALIASES = {"eps": "epsilon", "v": "v_prediction", "velocity": "flow", "flow_prediction": "flow", "x0": "sample"}


def canonical_prediction_type(name: str) -> str:
    """Normalise a prediction-type name; unknown names raise a one-line error."""
    name = _ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise StepdistillError(
            f"unsupported prediction type {name!r}; expected one of {', '.join(PREDICTION_TYPES)}"
        )
    return name


def prediction_to_x0(out: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """x0 estimate from a network output; a, s broadcast against x_t [B, ...]."""
    out, x_t = out.float(), x_t.float()
    if prediction_type == "epsilon":
        return (x_t - s * out) / a
    if prediction_type == "v_prediction":
        return (a * x_t - s * out) / (a**2 + s**2)
    if prediction_type == "flow":
        return (x_t - s * out) / (a + s)
    if prediction_type == "sample":
        return out
    raise StepdistillError(f"unsupported prediction type {prediction_type!r}")


def x0_to_prediction(x0: Tensor, noise: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """The network output that corresponds to (x0, noise): the native regression target."""
    x0, noise = x0.float(), noise.float()
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a * noise - s * x0
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "sample":
        return x0
    raise StepdistillError(f"unsupported prediction type {prediction_type!r}")
