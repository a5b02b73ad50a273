"""sCM: continuous-time consistency distillation in TrigFlow (sCD).

Paper: "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", Lu & Song,
ICLR 2025, arXiv:2410.11081 (Sec. 4, Eq. 6-8, Alg. 1); SANA-Sprint (arXiv:2503.09641) for the
training-free flow -> TrigFlow conversion. Teachers and students of any VP / flow schedule are
seen in TrigFlow through ``stepdistill.trigflow.TrigFlowView`` (SNR matching).

Per sample, f_theta(x, t) = cos t x - sin t sigma_d F_theta(x / sigma_d, t) (t is TrigFlow's angle):

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d)                          time sampling
    x_t = cos t x0 + sin t z,  z ~ N(0, sigma_d^2 I)
    dx_t/dt = sigma_d F_T(x_t / sigma_d, t) = (cos t x_t - x0_T) / sin t             teacher PF-ODE (CFG w)
    F^-, J = jvp(F_theta^-, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))            J = cos t sin t dF^-/dt
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d J)          Eq. 8, r = min(1, n / H)
    g <- g / (rms(g) + c)                                                           tangent normalisation
    L = w(t) / e^{u_phi(t)} mean((F_theta - sg F_theta - g)^2) + u_phi(t),  w = 1/(sigma_d tan t)   adaptive weight

The tangent is computed with ``torch.func.jvp`` (math SDPA, GroupNorm contiguity hook) or by
central finite differences (``tangent: finite_diff``); if the JVP raises, the objective warns
once and uses finite differences for the rest of the run. ``fd_native_steps: k`` > 0 replaces both
with a macro central difference whose step spans k native teacher steps either side of each
sample's time: a diffusers time embedding of 1000 t has sub-step structure that dominates the exact
JVP of a network trained only at integer steps (issue 17 item 5, ``eval/ABLATIONS.md`` rows 37-41). u_phi is a small trainable network
over t (``extra_networks``: "logvar", optimised in the student phase with the ``discriminator``
optimizer section); it also holds the warm-up counter n (student-loss evaluations), so the
warm-up resumes exactly. The student is trained at random t, so one model samples with any
1-4 times (``stepdistill.consistency.trig_sample``; trainer samples at ``student.times``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...contract import expand_like
from ...training.networks import unwrap
from ...tangent import TANGENT_METHODS, directional_derivative
from ...trigflow import TrigFlowView, trig_time, x0_to_F
from ..base import Batch, LossOut, Nets, Objective
from .common import GUIDANCE_EMBEDDING, CleanSamples, add_guidance_embedding, guided_per_sample, sample_guidance
from ..registry import register


class LogVarNet(nn.Module):
    """u_phi(t): Fourier features of the TrigFlow angle -> log-variance (zero at init), plus a call counter."""

    def __init__(self, features: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, 2, features))  # [K], 1 ... 100 rad^-1
        self.linear = nn.Linear(2 * features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # tangent warm-up counter n

    def forward(self, theta: Tensor) -> Tensor:
        arg = theta.float()[:, None] * self.freqs[None]  # [B, K]
        return self.linear(torch.cat([arg.sin(), arg.cos()], 1)).squeeze(1)  # [B]


def _modules(view) -> list[nn.Module]:
    module = unwrap(getattr(view, "module", view))
    return [module] if isinstance(module, nn.Module) else []


@register("scm")
@dataclass
class SCM(Objective):
    sigma_data: float = 0.5  # sigma_d of TrigFlow (SANA-Sprint, sCM: 0.5)
    p_mean: float = -1.0  # time sampling: log sigma ~ N(P_mean, P_std^2), t = arctan(sigma / sigma_d) (sCM CIFAR: -1.0)
    p_std: float = 1.4  # (sCM CIFAR: 1.4; ImageNet-64: 1.6; SANA-Sprint: (0.2, 1.6))
    max_time_prob: float = 0.0  # share of samples trained at the largest time, the one-step endpoint (after SANA-Sprint's max-time weighting, p = 0.5, which it applies to its adversarial branch)
    t_max: float = 1.0  # largest teacher time used (stepdistill t); e.g. 0.95 on a cosine-schedule eps teacher
    guidance_scale_min: float = 1.0  # teacher CFG w ~ U[min, max] (Ho-Salimans, 1 = off)
    guidance_scale_max: float = 1.0
    guidance_embedding: str = "auto"  # auto | on | off: give w to a student with a guidance input (time_cond_proj_dim)
    tangent: str = "jvp"  # jvp (torch.func.jvp, math SDPA) | finite_diff (central difference)
    fd_step: float = 1e-4  # finite-difference step h along the tangent direction (diffusers time embeddings see 1000 t: keep h small)
    fd_native_steps: float = 0.0  # > 0: the tangent is a central difference over this many of the teacher's native steps each way, per sample (a macro tangent that skips the time embedding's sub-step structure; overrides tangent and fd_step)
    tangent_warmup: int = 1000  # H: r = min(1, n / H), n = student-loss evaluations (sCM: 10k; Sprint: 4k)
    tangent_norm_c: float = 0.1  # c in g / (rms(g) + c) (sCM: 0.1)
    adaptive_weighting: bool = True  # learned log-variance u_phi(t) (sCM Eq. 8); false: u = 0
    synthetic_pool: int = 512  # without data.real: teacher samples made once (fixed seed) to noise; 0 = fresh each batch
    synthetic_steps: int = 16  # teacher PF-ODE steps per synthetic sample

    trains = ("student", "logvar")
    ranges = {"sigma_data": (1e-6, None), "p_std": (0.0, None), "t_max": (1e-3, 1.0),
              "guidance_scale_min": (0.0, "guidance_scale_max"), "fd_step": (1e-8, 1.0), "fd_native_steps": (0.0, None),
              "max_time_prob": (0.0, 1.0), "tangent_warmup": (0, None), "tangent_norm_c": (0.0, None)}
    choices = {"tangent": TANGENT_METHODS, "guidance_embedding": GUIDANCE_EMBEDDING}
    is_consistency = True  # trained at random t: one model samples with any 1-4 times
    exports_any_step_count = True

    def setup(self):
        self._data = CleanSamples(self.synthetic_pool, self.synthetic_steps, self.guidance_scale_max)
        self._jvp_failed = False  # set on the first JVP error: finite differences from then on

    def phase_updates(self, phase: str) -> tuple[str, ...]:
        return ("student", "logvar")

    def extra_networks(self, teacher) -> dict[str, nn.Module]:
        return {"logvar": LogVarNet()}

    def sample_theta(self, batch: Batch, rng: torch.Generator, view: TrigFlowView) -> Tensor:
        """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2), clamped to the teacher's range [B]; with
        ``max_time_prob`` > 0 that share of samples sits at the largest time (a max-time branch: SANA-Sprint
        evaluates its adversarial branch's student at the largest time with probability 0.5; here sCM's own samples)."""
        tau = self.p_mean + self.p_std * torch.randn(batch.size, generator=rng)
        theta = torch.atan(tau.exp() / self.sigma_data)
        hi = min(view.theta_max, float(trig_time(view.denoiser.schedule, torch.tensor([self.t_max]), self.sigma_data)))
        lo = max(view.theta_min, 1e-3)
        theta = theta.clamp(lo + 1e-3, hi - 1e-3)
        if self.max_time_prob > 0:  # drawn only when on, so runs without it keep their random stream
            theta = torch.where(torch.rand(batch.size, generator=rng) < self.max_time_prob, hi - 1e-3, theta)
        return theta.to(batch.device)

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        sd = self.sigma_data
        teacher, student = TrigFlowView(nets.teacher, sd), TrigFlowView(nets.student, sd)
        x0, cond, source = self._data.draw(nets, batch, rng)
        theta = self.sample_theta(batch, rng, teacher)  # [B]
        c, s = expand_like(theta.cos(), x0), expand_like(theta.sin(), x0)
        x_t = (c * x0.float() + s * sd * batch.noise(rng).float())  # [B, ...] TrigFlow state
        w = sample_guidance(batch, rng, self.guidance_scale_min, self.guidance_scale_max)
        student_cond = add_guidance_embedding(cond, nets.student, w, self.guidance_embedding)
        logvar_net = nets.extra["logvar"]
        with torch.no_grad():
            x0_teacher = guided_per_sample(teacher, x_t, theta / (math.pi / 2), cond, batch.null_cond, w)
            dxdt = (c * x_t - x0_teacher.float()) / s  # [B, ...] = sigma_d F_teacher
            F_minus, J = self.tangent_of(student, x_t, theta, dxdt, student_cond)
            unwrap(logvar_net).calls += 1
            r = min(1.0, float(unwrap(logvar_net).calls) / self.tangent_warmup) if self.tangent_warmup else 1.0
            g = scm_tangent(F_minus, J, x_t, dxdt, theta, r, sd)
            g = g / (_rms(g) + self.tangent_norm_c)
        F = x0_to_F(x_t, student.at_theta(x_t.to(x0.dtype), theta, student_cond), theta, sd)  # [B, ...], with grad
        u = logvar_net(theta) if self.adaptive_weighting else torch.zeros_like(theta)  # [B]
        weight = 1 / (sd * torch.tan(theta))  # prior weight 1 / sigma
        mse = ((F - F.detach() - g) ** 2).reshape(len(F), -1).mean(1)  # [B]
        loss = (weight / u.exp() * mse + u).mean()
        logs = {"scm_tangent_rms": _rms(g).mean().item(), "scm_warmup_r": r, "scm_logvar": u.detach().mean().item(),
                "tangent_fd": float(self.tangent == "finite_diff" or self._jvp_failed or self.fd_native_steps > 0), "real_data": float(source == "real")}
        return LossOut(loss, logs)

    def tangent_of(self, student: TrigFlowView, x: Tensor, theta: Tensor, dxdt: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(F^-(x, t), cos t sin t dF^-/dt along the teacher ODE), in fp32 without autocast."""
        cs = theta.cos() * theta.sin()  # [B]

        solved = student.solve(theta)  # the time map's solver, outside forward AD

        def F_of(x_in: Tensor, th: Tensor) -> Tensor:
            return x0_to_F(x_in, student.at_theta(x_in, th, cond, solved), th, self.sigma_data)

        primals, tangents = (x.float(), theta.float()), (expand_like(cs, x) * dxdt.float(), cs.float())
        if self.fd_native_steps > 0:  # macro steps: the time map solved at each evaluated angle, not linearised
            def F_exact(x_in: Tensor, th: Tensor) -> Tensor:
                return x0_to_F(x_in, student.at_theta(x_in, th, cond), th, self.sigma_data)

            with torch.autocast(x.device.type, enabled=False):
                return directional_derivative(F_exact, primals, tangents, "finite_diff", h=self.macro_step(student, theta, solved[0]))
        method = "finite_diff" if (self.tangent == "finite_diff" or self._jvp_failed) else "jvp"
        with torch.autocast(x.device.type, enabled=False):
            if method == "jvp":
                try:
                    return directional_derivative(F_of, primals, tangents, "jvp", _modules(student.denoiser))
                except (NotImplementedError, RuntimeError) as e:
                    self._jvp_failed = True
                    warnings.warn(f"sCM: torch.func.jvp failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                  "using finite differences (objective.tangent=finite_diff) from now on", stacklevel=2)
            return directional_derivative(F_of, primals, tangents, "finite_diff", h=self.fd_step)

    def macro_step(self, view: TrigFlowView, theta: Tensor, t: Tensor) -> Tensor:
        """Per-sample h [B] so that theta +- h cos t sin t spans ``fd_native_steps`` native teacher steps each way.

        ``t`` is the teacher time at theta (``view.solve``); the time embedding then sees two points
        k steps apart, not its sub-step structure (issue 17 item 5; fidelity review #11)."""
        schedule = view.denoiser.schedule
        dt = float(schedule.from_native(torch.tensor(self.fd_native_steps)))
        up = trig_time(schedule, (t + dt).clamp(0, 1), self.sigma_data).double()
        down = trig_time(schedule, (t - dt).clamp(0, 1), self.sigma_data).double()
        cs = (theta.double().cos() * theta.double().sin()).clamp_min(1e-12)
        return ((up - down) / 2 / cs).clamp_min(1e-8).to(theta.device, torch.float32)


def scm_tangent(F_minus: Tensor, J: Tensor, x_t: Tensor, dxdt: Tensor, theta: Tensor, r: float, sigma_d: float) -> Tensor:
    """g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d J), J = cos t sin t dF^-/dt (sCM Eq. 8).

    Zero (for r = 1) exactly when f^- = cos t x - sin t sigma_d F^- is constant along the ODE.
    """
    c, s = expand_like(theta.cos(), x_t), expand_like(theta.sin(), x_t)
    return -c**2 * (sigma_d * F_minus - dxdt) - r * (c * s * x_t + sigma_d * J)


def _rms(g: Tensor) -> Tensor:
    """Per-sample root-mean-square, broadcastable to g [B, 1, ...] (resolution-invariant norm)."""
    return expand_like(g.reshape(len(g), -1).pow(2).mean(1).sqrt(), g)
