"""DMD: Distribution Matching Distillation.

Paper: "One-step Diffusion with Distribution Matching Distillation", Yin et al., CVPR 2024,
arXiv:2311.18828 (and the normaliser kept by DMD2, arXiv:2405.14867, Sec. 3 / Eq. 2-3).

Student phase (mode A, stop-grad direction), all in x0 space:

    x = G(z)                                       one- or K-step student: a random step k's x0, grad on it only
    x_t = alpha_t x + sigma_t eps,   t ~ U[t_min, t_max]                      (DMD Sec. 3.2)
    x_real = T_w(x_t, t, c),  x_fake = F(x_t, t, c)                (no graph; w = teacher CFG)
    g = (x_fake - x_real) / mean_{C,H,W} |x - x_real|              (Eq. 8's normaliser, DMD2)
    L_G = 1/2 mean((x - sg(x - g))^2)      so dL/dx = g / N  (the stop-grad MSE surrogate)
        + lambda_reg * mean((G(z_i) - y_i)^2)   optional regression on teacher ODE pairs (Eq. 9;
                                                 the paper uses LPIPS, here plain MSE)

Fake-score phase (denoising score matching on the student's samples, DMD Eq. 6):

    L_F = mean( lambda(t) |F(x_t, t, c) - sg(x)|^2 ),  lambda from ``critic_weighting``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...conditioning import guided
from ...contract import add_noise, expand_like
from ...sampling import ddim_sample, few_step_sample
from ...schedules import LOSS_WEIGHTINGS, loss_weight
from ..base import Batch, LossOut, Nets, Objective
from .common import student_sample
from ..registry import register


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).mean(1)  # [B]


def sample_stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": x.mean().item(), f"{prefix}_std": x.std().item()}


@register("dmd")
@dataclass
class DMD(Objective):
    guidance_scale: float = 1.0  # teacher CFG scale kappa_real (Ho-Salimans; 1 = off)
    fake_guidance_scale: float = 1.0  # CFG on the fake score (DMD/DMD2: 1)
    t_min: float = 0.02  # DM-gradient times t ~ U[t_min, t_max] (DMD: [0.02T, 0.98T])
    t_max: float = 0.98
    critic_t_min: float = 0.02  # fake-score training times
    critic_t_max: float = 0.98
    critic_weighting: str = "eps"  # x0-MSE weight: x0 | eps | v | flow (eps = DMD2's SD loss)
    critic_ratio: int = 1  # fake-score updates per student update (TTUR; DMD 1, DMD2 5-10)
    normaliser_eps: float = 1e-6  # added to mean|x - x_real| (FastGen; DMD2 uses none)
    regression_weight: float = 0.0  # lambda_reg on teacher ODE pairs (DMD1: 0.25 with LPIPS)
    regression_pairs: int = 256  # number of (noise, teacher sample) pairs, made once
    regression_steps: int = 25  # teacher ODE steps used to make the pairs
    regression_seed: int = 1234  # seed of the pair set (fixed: resume-safe)

    trains = ("student", "fake_score")
    ranges = {"critic_ratio": (1, None), "t_min": (0.0, "t_max"), "critic_t_min": (0.0, "critic_t_max"),
              "regression_weight": (0.0, None)}
    choices = {"critic_weighting": LOSS_WEIGHTINGS}

    def setup(self):
        self._pairs = None  # teacher ODE pairs, made on first use

    @property
    def phases(self) -> dict[str, int]:
        return {"fake_score": self.critic_ratio, "student": 1}

    def fake_score_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        with torch.no_grad():  # K-step students: the output of a random step k (backward simulation, DMD2 Sec. 4.5)
            x, _ = student_sample(nets, batch, rng, grad=False)  # [B, ...]
        t = batch.uniform(rng, self.critic_t_min, self.critic_t_max)  # [B]
        x_t = add_noise(nets.fake_score.schedule, x, batch.noise(rng), t)
        x_fake = nets.fake_score(x_t, t, batch.cond)  # [B, ...]
        weight = loss_weight(nets.fake_score.schedule, t, self.critic_weighting).to(x.device)  # [B]
        loss = (weight * per_sample_mean((x_fake.float() - x.float()) ** 2)).mean()  # DMD Eq. 6
        return LossOut(loss, {"fake_x0_mse": per_sample_mean((x_fake.detach() - x) ** 2).mean().item()})

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x, _ = student_sample(nets, batch, rng, grad=True)  # [B, ...], graph through step k only
        loss, logs = self.dm_loss(nets, batch, rng, x)
        if self.regression_weight > 0:
            reg = self.regression_loss(nets, batch, rng)
            loss = loss + self.regression_weight * reg
            logs["regression_loss"] = reg.item()
        return LossOut(loss, logs)

    def dm_loss(self, nets: Nets, batch: Batch, rng: torch.Generator, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The distribution-matching surrogate and its logs for student samples x [B, ...] (with graph)."""
        t = batch.uniform(rng, self.t_min, self.t_max)
        with torch.no_grad():
            x_t = add_noise(nets.teacher.schedule, x.detach(), batch.noise(rng), t)
            x_real = guided(nets.teacher, x_t, t, batch.cond, batch.null_cond, self.guidance_scale)
            x_fake = guided(nets.fake_score, x_t, t, batch.cond, batch.null_cond, self.fake_guidance_scale)
            w = 1 / (per_sample_mean((x.detach().float() - x_real.float()).abs()) + self.normaliser_eps)  # [B]
            g = (x_fake.float() - x_real.float()) * expand_like(w, x)  # DMD Eq. 7-8 direction
        loss = 0.5 * torch.nn.functional.mse_loss(x.float(), (x.detach().float() - g))  # surrogate, grad g/N
        logs = {"dm_loss": loss.item(), "dm_grad_norm": g.reshape(len(g), -1).norm(dim=1).mean().item()}
        logs |= sample_stats("x_real", x_real) | sample_stats("x_fake", x_fake) | sample_stats("x_student", x.detach())
        return loss, logs

    def regression_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> torch.Tensor:
        """MSE between G(z_i) and the teacher's ODE sample y_i for a random subset of fixed pairs."""
        if self._pairs is None:
            self._pairs = self.make_pairs(nets, batch)
        z, y, cond = self._pairs
        idx = torch.randint(0, len(z), (batch.size,), generator=rng)
        sub = {k: v[idx.to(v.device)] for k, v in cond.items()}
        x = few_step_sample(nets.student, z[idx.to(z.device)], sub, nets.student_times, rng, grad=True)
        return torch.nn.functional.mse_loss(x.float(), y[idx.to(y.device)].float())

    def make_pairs(self, nets: Nets, batch: Batch):
        """Teacher ODE pairs (z, y = ODE(z)), generated once from a fixed seed.

        The ODE starts where the student's input lives: pure noise at the student's first time
        (e.g. DDPM step 755 for ``student.sigmas=[2.5]``), so G(z) and y solve the same problem.
        Started at t = 1 instead, y would be the sample of a different noise level than G's input.
        """
        g = torch.Generator().manual_seed(self.regression_seed)
        n = self.regression_pairs
        cond, null = batch.conditions(n, g) if batch.conditions else (batch.cond, batch.null_cond)
        z = batch.noise(g, n)
        y = ddim_sample(nets.teacher, z, cond, self.regression_steps, null, self.guidance_scale,
                        t_max=float(nets.student_times[0]))
        return z, y, cond
