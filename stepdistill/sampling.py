"""Samplers under the contract, as plain functions (k-diffusion style).

* ``few_step_sample``: the student generator. Step k maps x at time t_k to x0_hat, then
  re-noises x0_hat to t_{k+1} with fresh noise (x0-then-renoise, as ``LCMScheduler`` and
  ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` replay it at export).
* ``ddim_sample``: the deterministic probability-flow ODE solver for teachers (DDIM in x0
  form, equal to Euler for flow schedules): the baseline and regression-pair generator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .conditioning import guided
from .contract import Cond, Denoiser, NoiseSchedule, add_noise, as_time, expand_like


def init_noise_sigma(schedule: NoiseSchedule) -> float:
    """Scale of the pure-noise input: 1 for VP and flow, sigma_d for TrigFlow."""
    return float(getattr(schedule, "sigma_d", 1.0))


def few_step_sample(
    student: Denoiser,
    noise: Tensor,
    cond: Cond | None,
    times: Sequence[float],
    generator: torch.Generator | None = None,
    grad: bool = False,
    stop_after: int | None = None,
    noise_fn: Callable[[tuple[int, ...]], Tensor] | None = None,
) -> Tensor:
    """K-step generation at fixed times (descending), input pure noise at ``times[0]``.

    Args:
        noise: [B, ...] unit Gaussian noise, the generator's input.
        times: continuous times t_0 > t_1 > ... (one entry = one-step generator).
        generator: RNG for the re-noising between steps (CPU draws, as the exported pipelines).
        noise_fn: the re-noising noise source instead of ``generator`` (shape -> [B, ...] tensor;
            e.g. one generator per sample, so samples do not depend on the batch).
        grad: build a graph through the last evaluated step only (earlier steps run without
            grad: backward simulation as in DMD2).
        stop_after: evaluate only steps 0..stop_after (default: all) and return that x0_hat.
    Returns:
        x0_hat [B, ...].
    """
    last = len(times) - 1 if stop_after is None else stop_after
    x = noise * init_noise_sigma(student.schedule)
    for k in range(last + 1):
        t = as_time(times[k], x)
        with torch.set_grad_enabled(grad and k == last):
            x0 = student(x, t, cond)
        if k < last:
            z = noise_fn(tuple(x.shape)) if noise_fn else torch.randn(x.shape, generator=generator, device="cpu")
            z = z.to(x.device, x.dtype)
            x = add_noise(student.schedule, x0.detach(), z, as_time(times[k + 1], x))
    return x0


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Cond | None,
    num_steps: int,
    null_cond: Cond | None = None,
    guidance_scale: float = 1.0,
    t_max: float = 1.0,
    t_min: float = 0.0,
) -> Tensor:
    """Deterministic DDIM / Euler on the probability-flow ODE from t_max down to t_min.

    x_{next} = alpha(s) x0_hat + sigma(s) eps_hat, eps_hat = (x_t - alpha(t) x0_hat) / sigma(t).
    The last step returns x0_hat itself. Input: pure noise at t_max. A teacher whose scheduler
    clips x0 (``clip_sample``, e.g. a cosine schedule where alpha(1) ~ 5e-5 makes the first
    x0_hat unbounded) has x0_hat clipped the same way (``schedule.x0_clip``).
    """
    ts = torch.linspace(t_max, t_min, num_steps + 1)
    sched = denoiser.schedule
    clip = getattr(sched, "x0_clip", None)
    x = noise * init_noise_sigma(sched)
    for i in range(num_steps):
        t, s = as_time(ts[i], x), as_time(ts[i + 1], x)
        x0 = guided(denoiser, x, t, cond or {}, null_cond, guidance_scale)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if i == num_steps - 1:
            return x0
        eps = (x.float() - expand_like(sched.alpha(t), x) * x0.float()) / expand_like(sched.sigma(t), x)
        x = (expand_like(sched.alpha(s), x) * x0.float() + expand_like(sched.sigma(s), x) * eps).to(x.dtype)
    return x
