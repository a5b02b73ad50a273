"""Noise schedules on continuous t in [0, 1] (0 = data, 1 = noise).

* ``VPSchedule``: variance preserving, built from any diffusers scheduler's betas (DDPM, DDIM,
  SD1.5/SDXL). Continuous t maps to the native DDPM step as ``step = t * (N - 1)`` so t = 1 is
  step 999 (the one-step student's input) and fractional steps interpolate log(alpha_bar).
  Note that t = 0 is step 0, where sigma is small but not zero (sqrt(beta_0)).
* ``FlowSchedule``: rectified flow (SD3, FLUX, SANA): x_t = (1 - t) x0 + t noise, native
  timestep ``t * 1000`` as ``FlowMatchEulerDiscreteScheduler`` uses.
* ``TrigSchedule``: TrigFlow (sCM): x_t = cos(theta) x0 + sin(theta) sigma_d z, theta = t pi / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import NoiseSchedule, StepdistillError


class VPSchedule:
    """Variance-preserving schedule from a table alpha_bar[0..N-1] (DDPM steps)."""

    kind = "vp"
    x0_clip: float | None = None  # the teacher's scheduler clips x0 to [-r, r] (``clip_sample``): its solvers do too

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac <= 1)).all()):
            raise StepdistillError("VPSchedule needs a 1-D alphas_cumprod table with values in (0, 1]")
        self.num_train_timesteps = len(ac)
        self._log_ac = ac.log()  # [N], interpolated linearly for fractional steps

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPSchedule":
        """Build from a diffusers scheduler instance that has ``alphas_cumprod`` (DDPM, DDIM, LCM...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise StepdistillError(f"{type(scheduler).__name__} has no alphas_cumprod: not a VP (DDPM-style) scheduler")
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict) -> "VPSchedule":
        """Build from a diffusers scheduler config (betas, beta_schedule, num_train_timesteps)."""
        from diffusers import DDPMScheduler

        schedule = cls.from_scheduler(DDPMScheduler.from_config(dict(config)))
        if config.get("clip_sample"):
            schedule.x0_clip = float(config.get("clip_sample_range", 1.0))
        return schedule

    def alpha_bar(self, t: Tensor) -> Tensor:
        step = self.to_native(t).double().clamp(0, self.num_train_timesteps - 1)
        lo = step.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = step - lo
        log_ac = self._log_ac.to(step.device)
        return ((1 - w) * log_ac[lo] + w * log_ac[hi]).exp().float()

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alpha_bar(t)).clamp_min(0).sqrt()

    def to_native(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * (self.num_train_timesteps - 1)

    def from_native(self, timestep: Tensor) -> Tensor:
        return torch.as_tensor(timestep, dtype=torch.float32) / (self.num_train_timesteps - 1)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: alpha = 1 - t, sigma = t; native timestep = t * num_train_timesteps."""

    num_train_timesteps: int = 1000
    kind: str = "flow"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - torch.as_tensor(t, dtype=torch.float32)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32)

    def to_native(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * self.num_train_timesteps

    def from_native(self, timestep: Tensor) -> Tensor:
        return torch.as_tensor(timestep, dtype=torch.float32) / self.num_train_timesteps


@dataclass(frozen=True)
class TrigSchedule:
    """TrigFlow: alpha = cos(theta), sigma = sigma_d sin(theta), theta = t pi/2; native = theta."""

    sigma_d: float = 0.5
    kind: str = "trig"

    def _theta(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * (math.pi / 2)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(self._theta(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_d * torch.sin(self._theta(t))

    def to_native(self, t: Tensor) -> Tensor:
        return self._theta(t)

    def from_native(self, timestep: Tensor) -> Tensor:
        return torch.as_tensor(timestep, dtype=torch.float32) / (math.pi / 2)


LOSS_WEIGHTINGS = ("x0", "eps", "v", "flow")


def loss_weight(schedule: NoiseSchedule, t: Tensor, weighting: str, max_weight: float = 1e4) -> Tensor:
    """Per-sample weight that turns an x0-space MSE into the MSE of another parameterisation.

    With x0_hat = x0 + delta: eps-MSE = (alpha/sigma)^2 |delta|^2, v-MSE (VP) = |delta|^2 / sigma^2,
    flow-velocity MSE = ((alpha + sigma)/sigma)^2 |delta|^2. Clamped at ``max_weight`` (fp32).
    """
    a, s = schedule.alpha(t).float(), schedule.sigma(t).float().clamp_min(1e-6)
    weights = {"x0": torch.ones_like(a), "eps": (a / s) ** 2, "v": 1 / s**2, "flow": ((a + s) / s) ** 2}
    if weighting not in weights:
        raise StepdistillError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
    return weights[weighting].clamp(max=max_weight)


def schedule_from_scheduler_config(config: dict) -> NoiseSchedule:
    """Pick the schedule that matches a diffusers scheduler config (its ``_class_name``)."""
    name = config.get("_class_name", "")
    if "FlowMatch" in name or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":  # SANA: DPM-Solver on flow sigmas
        return FlowSchedule(int(config.get("num_train_timesteps", 1000)))
    if name == "SCMScheduler":
        return TrigSchedule(float(config.get("sigma_data", 0.5)))
    return VPSchedule.from_config(config)
