"""The one network contract every objective relies on.

    x0_hat = D(x_t, t, cond)        x_t = alpha(t) * x0 + sigma(t) * noise,   t in [0, 1]

``t`` is continuous: 0 is (almost) clean data, 1 is pure noise. Each denoiser carries the
``NoiseSchedule`` that defines ``alpha(t)``, ``sigma(t)`` and the map from ``t`` to the model's
native timestep input. Adapters (``stepdistill.adapters``) hide every parameterisation detail
(epsilon / v / flow velocity / sample prediction, discrete timesteps, dtypes), so objectives
only ever see x0 predictions.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

Cond = Mapping[str, Any]  # e.g. {"class_labels": [B]} or {"prompt_embeds": [B, L, D]}


class StepdistillError(Exception):
    """An error the user can act on; the CLI prints it as one line (exit code 2)."""


@runtime_checkable
class NoiseSchedule(Protocol):
    """Forward process x_t = alpha(t) x0 + sigma(t) noise on continuous t in [0, 1]."""

    def alpha(self, t: Tensor) -> Tensor: ...

    def sigma(self, t: Tensor) -> Tensor: ...

    def to_native(self, t: Tensor) -> Tensor:
        """The model's own timestep input for continuous t (e.g. a DDPM step in [0, 999])."""
        ...

    def from_native(self, timestep: Tensor) -> Tensor: ...


@runtime_checkable
class Denoiser(Protocol):
    """Anything that maps a noisy sample to an x0 estimate under the contract."""

    schedule: NoiseSchedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor: ...


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] to broadcast against x [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Per-sample fp32 time vector [B] for a batch x [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]).clone() if t.ndim == 0 else t.float()


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process: x_t = alpha(t) x0 + sigma(t) noise, coefficients in fp32."""
    a = expand_like(schedule.alpha(t), x0)
    s = expand_like(schedule.sigma(t), x0)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


def x0_to_eps(schedule: NoiseSchedule, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """The noise implied by an x0 estimate: eps = (x_t - alpha x0) / sigma."""
    a = expand_like(schedule.alpha(t), x_t)
    s = expand_like(schedule.sigma(t), x_t)
    return (x_t.float() - a * x0.float()) / s


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2 (fp32)."""
    return (schedule.alpha(t) / schedule.sigma(t)) ** 2
