"""Training-free conversion of any VP / flow denoiser to TrigFlow (sCM's parameterisation).

TrigFlow (Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", arXiv:2410.11081, Sec. 2): x_theta = cos(theta) x0 + sin(theta) z, z ~ N(0, sigma_d^2 I),
theta in [0, pi/2], and the network F with x0_hat = cos(theta) x - sin(theta) sigma_d F(x / sigma_d, theta).

A teacher with x_t = alpha_t x0 + sigma_t eps is matched by signal-to-noise ratio
(reference objectives.md Sec. 0.1; FastGen's TrigFlowPrecond, SANA-Sprint's flow case):

    theta(t) = atan2(sigma_t, alpha_t sigma_d)                  (equal SNR: tan theta = sigma_t / (alpha_t sigma_d))
    x_t      = x_theta * sqrt(alpha_t^2 + sigma_t^2 / sigma_d^2)   (= alpha_t x_theta / cos theta)
    F        = (cos theta x_theta - x0_hat) / (sin theta sigma_d)

so ``TrigFlowView(denoiser)`` is again a ``Denoiser`` (under ``TrigSchedule(sigma_d)``, whose
continuous time u maps to theta = u pi/2). The inverse time map theta -> t is differentiable:
its value comes from a table and regula falsi on log(sigma_t / alpha_t), its derivative from the implicit
function theorem, so forward-mode AD (sCM's JVP) sees d t / d theta. ``TrigFlowView.solve`` runs the solver
once outside the JVP (it is many small ops, slow under ``torch.func``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contract import Cond, Denoiser, NoiseSchedule, as_time, expand_like
from .schedules import TrigSchedule


def _log_ratio(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """log(sigma_t / alpha_t), increasing in t (float64) [B]."""
    a = schedule.alpha(t).double().clamp_min(1e-30)
    return schedule.sigma(t).double().clamp_min(1e-30).log() - a.log()


def trig_time(schedule: NoiseSchedule, t: Tensor, sigma_d: float = 0.5) -> Tensor:
    """theta(t) = atan2(sigma_t, alpha_t sigma_d): the TrigFlow time of equal SNR [B]."""
    return torch.atan2(schedule.sigma(t).double(), schedule.alpha(t).double() * sigma_d).float()


def theta_range(schedule: NoiseSchedule, sigma_d: float = 0.5) -> tuple[float, float]:
    """The TrigFlow times the teacher covers: (theta(0), theta(1))."""
    ends = trig_time(schedule, torch.tensor([0.0, 1.0]), sigma_d)
    return float(ends[0]), float(ends[1])


_TABLES: dict[int, tuple[NoiseSchedule, Tensor, Tensor]] = {}


def _table(schedule: NoiseSchedule, size: int = 4097) -> tuple[Tensor, Tensor]:
    """(t grid [M], log(sigma/alpha) on it [M]) in float64, cached per schedule object."""
    hit = _TABLES.get(id(schedule))
    if hit is None or hit[0] is not schedule:
        grid = torch.linspace(0, 1, size, dtype=torch.float64)
        hit = _TABLES[id(schedule)] = (schedule, grid, torch.cummax(_log_ratio(schedule, grid), 0).values)
    return hit[1], hit[2]


def _log_tan(theta: Tensor, sigma_d: float) -> Tensor:
    """log(sigma_d tan theta) (float64): the log(sigma/alpha) a teacher time must match [B]."""
    th = theta.double()
    return math.log(sigma_d) + torch.sin(th).clamp_min(1e-30).log() - torch.cos(th).clamp_min(1e-30).log()


@torch.no_grad()
def solve_native_time(schedule: NoiseSchedule, theta: Tensor, sigma_d: float = 0.5, iters: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """(t, g'(t), goal) [B] float64 with log(sigma_t/alpha_t) = log(sigma_d tan theta), g = log(sigma/alpha); no AD.

    The bracket comes from a 4097-point table of g, narrowed by regula falsi; g' is a central
    difference with step min(1e-3, 0.1 t, 0.1 (1 - t)).
    """
    goal = _log_tan(theta.detach(), sigma_d)
    grid, table = (v.to(goal.device) for v in _table(schedule))
    i = torch.searchsorted(table, goal).clamp(1, len(grid) - 1)  # table[i-1] < goal <= table[i]
    lo, hi, g_lo, g_hi = grid[i - 1], grid[i], table[i - 1], table[i]
    for _ in range(iters):
        t = lo + (hi - lo) * ((goal - g_lo) / (g_hi - g_lo).clamp_min(1e-300)).clamp(0, 1)
        g = _log_ratio(schedule, t)
        below = g < goal
        lo, g_lo = torch.where(below, t, lo), torch.where(below, g, g_lo)
        hi, g_hi = torch.where(below, hi, t), torch.where(below, g_hi, g)
    t = lo + (hi - lo) * ((goal - g_lo) / (g_hi - g_lo).clamp_min(1e-300)).clamp(0, 1)
    h = (0.1 * torch.minimum(t, 1 - t)).clamp(1e-6, 1e-3)
    slope = ((_log_ratio(schedule, t + h) - _log_ratio(schedule, t - h)) / (2 * h)).clamp_min(1e-12)
    return t, slope, goal


def attach_native_time(theta: Tensor, t: Tensor, slope: Tensor, goal: Tensor, sigma_d: float = 0.5) -> Tensor:
    """t + (log(sigma_d tan theta) - goal) / g'(t): the time map linearised at the solved point
    (exact value there; derivative dt/dtheta by the implicit function theorem)."""
    return (t + (_log_tan(theta, sigma_d) - goal) / slope).to(theta.dtype)


def native_time(schedule: NoiseSchedule, theta: Tensor, sigma_d: float = 0.5) -> Tensor:
    """The teacher time t with theta(t) = theta [B] (clamped to [0, 1]); differentiable in theta
    (forward and reverse AD) through the implicit function theorem."""
    return attach_native_time(theta, *solve_native_time(schedule, theta, sigma_d), sigma_d)


def input_scale(schedule: NoiseSchedule, t: Tensor, sigma_d: float = 0.5) -> Tensor:
    """sqrt(alpha_t^2 + sigma_t^2 / sigma_d^2): TrigFlow state -> teacher state [B]."""
    return (schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2 / sigma_d**2).sqrt()


def x0_to_F(x: Tensor, x0: Tensor, theta: Tensor, sigma_d: float) -> Tensor:
    """F = (cos theta x - x0_hat) / (sin theta sigma_d)   (TrigFlow's x0 parameterisation, inverted)."""
    c, s = expand_like(torch.cos(theta), x), expand_like(torch.sin(theta), x)
    return (c * x.float() - x0.float()) / (s * sigma_d)


def F_to_x0(x: Tensor, F: Tensor, theta: Tensor, sigma_d: float) -> Tensor:
    """x0_hat = cos theta x - sin theta sigma_d F."""
    c, s = expand_like(torch.cos(theta), x), expand_like(torch.sin(theta), x)
    return c * x.float() - s * sigma_d * F.float()


class TrigFlowView:
    """A denoiser seen in TrigFlow: ``view(x_theta, u, cond)`` with theta = u pi/2 -> x0_hat.

    Times outside the teacher's range (``theta_range``) are clamped to it.
    """

    def __init__(self, denoiser: Denoiser, sigma_d: float = 0.5):
        self.denoiser, self.sigma_d = denoiser, sigma_d
        self.schedule = TrigSchedule(sigma_d)
        self.theta_min, self.theta_max = theta_range(denoiser.schedule, sigma_d)

    def solve(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``solve_native_time`` for clamped theta: pass it to ``at_theta`` to reuse it (no AD inside)."""
        return solve_native_time(self.denoiser.schedule, theta.detach().clamp(self.theta_min, self.theta_max), self.sigma_d)

    def at_theta(self, x: Tensor, theta: Tensor, cond: Cond | None = None, solved: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """x0_hat for TrigFlow state x [B, ...] at angle theta [B].

        ``solved = view.solve(theta0)`` linearises the time map around theta0 (exact value and first
        derivative at theta0): forward AD then skips the solver's many small ops.
        """
        theta = theta.clamp(self.theta_min, self.theta_max)
        t = attach_native_time(theta, *(solved or self.solve(theta)), self.sigma_d)
        scale = input_scale(self.denoiser.schedule, t, self.sigma_d)
        return self.denoiser(x * expand_like(scale, x).to(x.dtype), t, cond)

    def __call__(self, x: Tensor, u: Tensor, cond: Cond | None = None) -> Tensor:
        return self.at_theta(x, as_time(u, x) * (math.pi / 2), cond)


__all__ = ["TrigFlowView", "trig_time", "native_time", "solve_native_time", "attach_native_time", "theta_range", "input_scale", "x0_to_F", "F_to_x0"]
