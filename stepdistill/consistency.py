"""Consistency functions and their samplers (LCM / TCD / sCM), as plain functions.

* Boundary condition (LCM, Luo et al., arXiv:2310.04378, Eq. 9-10, as ``LCMScheduler``):
  f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t) with, in the model's native timestep tau,
  c_skip = sigma_d^2 / ((k tau)^2 + sigma_d^2), c_out = k tau / sqrt((k tau)^2 + sigma_d^2),
  k = ``timestep_scaling`` (10). At t = 0 (tau = 0): c_skip = 1, c_out = 0, so f(x, 0) = x.
* ``ddim_step``: the skipping-step solver (DDIM in x0 form, Euler for flow schedules):
  x_s = alpha_s x0_hat + sigma_s eps_hat,  eps_hat = (x_t - alpha_t x0_hat) / sigma_t.
* ``tcd_sample``: TCD's strategic stochastic sampling (Zheng et al., arXiv:2402.19159, Sec. 4.3;
  diffusers ``TCDScheduler``): per step, x0 = f(x, t_k), DDIM to s = (1 - gamma) t_{k+1}, then
  forward-noise s -> t_{k+1}. gamma = 0: deterministic DDIM-like; gamma = 1: LCM (x0, then re-noise).
* ``trig_sample``: the step-adaptive sCM sampler (``SCMScheduler``): x0 = f(x, theta_k), then
  x = cos(theta_{k+1}) x0 + sin(theta_{k+1}) sigma_d z with fresh z.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .contract import Cond, Denoiser, NoiseSchedule, as_time, expand_like


def boundary_coefficients(schedule: NoiseSchedule, t: Tensor, sigma_d: float = 0.5, scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) [B] of LCM's boundary parameterisation (LCM Eq. 10; ``LCMScheduler``)."""
    tau = schedule.to_native(t).float() * scaling  # [B]
    c_skip = sigma_d**2 / (tau**2 + sigma_d**2)
    c_out = tau / (tau**2 + sigma_d**2).sqrt()
    return c_skip, c_out


def consistency_fn(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond | None, sigma_d: float = 0.5,
                   scaling: float = 10.0) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t): f(x, 0) = x exactly."""
    t = as_time(t, x)
    c_skip, c_out = boundary_coefficients(denoiser.schedule, t, sigma_d, scaling)
    x0 = denoiser(x, t, cond)  # [B, ...]
    return expand_like(c_skip, x) * x.float() + expand_like(c_out, x) * x0.float()


def ddim_step(schedule: NoiseSchedule, x_t: Tensor, x0: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DDIM (VP) / Euler (flow) step t -> s given x0_hat: alpha_s x0 + sigma_s eps_hat (fp32)."""
    a_t, s_t = expand_like(schedule.alpha(t), x_t), expand_like(schedule.sigma(t), x_t)
    eps = (x_t.float() - a_t * x0.float()) / s_t.clamp_min(1e-8)
    return expand_like(schedule.alpha(s), x_t) * x0.float() + expand_like(schedule.sigma(s), x_t) * eps


def renoise(schedule: NoiseSchedule, x_s: Tensor, s: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """Forward transition s -> t (t >= s): (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) z."""
    a = schedule.alpha(t) / schedule.alpha(s).clamp_min(1e-8)  # [B]
    var = (schedule.sigma(t) ** 2 - a**2 * schedule.sigma(s) ** 2).clamp_min(0)
    return expand_like(a, x_s) * x_s.float() + expand_like(var.sqrt(), x_s) * z.float()


@torch.no_grad()
def tcd_sample(denoiser: Denoiser, noise: Tensor, cond: Cond | None, times: Sequence[float], gamma: float = 0.3,
               generator: torch.Generator | None = None, sigma_d: float = 0.5, scaling: float = 10.0) -> Tensor:
    """Multi-step consistency sampling with TCD's stochasticity gamma (see the module docstring).

    Args:
        noise: [B, ...] unit noise, the input at ``times[0]``; times: descending in (0, 1].
        gamma: 0 = deterministic, 1 = LCM's x0-then-renoise (TCD default 0.3).
    Returns:
        x0_hat [B, ...] of the last step.
    """
    sched = denoiser.schedule
    x = noise.float()
    for k, tk in enumerate(times):
        t = as_time(tk, x)
        x0 = consistency_fn(denoiser, x, t, cond, sigma_d, scaling)
        if k == len(times) - 1:
            return x0.to(noise.dtype)
        t_next = as_time(times[k + 1], x)
        s = (1 - gamma) * t_next  # TCD: s = floor((1 - gamma) t_prev)
        x = ddim_step(sched, x, x0, t, s)
        if gamma > 0:
            z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            x = renoise(sched, x, s, t_next, z)
    return x


@torch.no_grad()
def trig_sample(view, noise: Tensor, cond: Cond | None, thetas: Sequence[float],
                generator: torch.Generator | None = None) -> Tensor:
    """sCM sampling at TrigFlow angles ``thetas`` (descending, e.g. [pi/2], [pi/2, 1.3], any 1-4).

    ``view`` is a ``trigflow.TrigFlowView`` (x0 = f(x, theta)); the input is sigma_d * noise.
    """
    sd = view.sigma_d
    x = noise.float() * sd
    for k, th in enumerate(thetas):
        theta = as_time(th, x)
        x0 = view.at_theta(x, theta, cond).float()
        if k == len(thetas) - 1:
            return x0.to(noise.dtype)
        nxt = expand_like(as_time(thetas[k + 1], x), x)
        z = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        x = torch.cos(nxt) * x0 + torch.sin(nxt) * sd * z
    return x


def trig_times(num_steps: int, theta_max: float = math.pi / 2, intermediate: float = 1.3) -> list[float]:
    """SCMScheduler's angles: 1 -> [max]; 2 -> [max, 1.3]; N > 2 -> linspace(max, 0, N + 1)[:-1]."""
    if num_steps == 1:
        return [theta_max]
    if num_steps == 2:
        return [theta_max, min(intermediate, theta_max)]
    return torch.linspace(theta_max, 0, num_steps + 1)[:-1].tolist()


__all__ = ["boundary_coefficients", "consistency_fn", "ddim_step", "renoise", "tcd_sample", "trig_sample", "trig_times"]
