"""VSD / SwiftBrush: variational score distillation into a one- or few-step student.

Paper: "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", Nguyen & Tran, CVPR 2024, arXiv:2312.05239 (Sec. 3-4, Alg. 1); VSD itself from
ProlificDreamer (Wang et al., arXiv:2305.16213, Eq. 9). Random-scale guidance from SNOOPI
(Nguyen et al., arXiv:2412.02687, "proper guidance", PG-SwiftBrush).

Recommended networks: the fake score is a LoRA on the teacher's own weights
(``fake_score.init: lora``; SwiftBrush: rank 64 on to_q/to_v, LoRA LR 1e-3), so teacher and
fake score are one network with adapters off / on, and the fake starts equal to the teacher.

Student phase (mode A, stop-grad direction), in x0 space:

    x = G(z);  t ~ U[t_min, t_max];  x_t = alpha_t x + sigma_t eps
    w = guidance_scale, or w ~ U[guidance_scale, guidance_scale_max] per sample (SNOOPI)
    x_T = x_u^T + w (x_c^T - x_u^T),   x_L = x_u^L + w (x_c^L - x_u^L)     same w on both (SwiftBrush)
    g = alpha_t sigma_t (x_L - x_T)    = sigma_t^2 (eps_T - eps_L), SwiftBrush's eps-space gradient
                                         (sqrt(abar (1 - abar)) for VP, t (1 - t) for flow)
    L_G = 1/2 mean((x - sg(x - g))^2)       dL/dx = g / N

Fake-score phase (after the student phase, on sg(x)), SwiftBrush Alg. 1:

    t ~ U[critic_t_min, critic_t_max];  c' = null with probability p_uncond (trains the fake's
    unconditional branch, so CFG on the fake works);  L_F = mean(lambda(t) |F(x_t, t, c') - x|^2)
    lambda = alpha^2 (alpha/sigma)^2 ("swiftbrush": the abar-weighted eps-MSE |sqrt(abar)(eps_hat - eps)|^2)

Multi-step students: backward simulation with a random step per update (``score_common``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...contract import StepdistillError, add_noise, expand_like
from ...schedules import LOSS_WEIGHTINGS, loss_weight
from ..base import Batch, LossOut, Nets, Objective
from ..consistency.common import guided_per_sample, sample_guidance
from .dmd import per_sample_mean, sample_stats
from ..registry import register
from .common import drop_to_null, student_sample

CRITIC_WEIGHTINGS = ("swiftbrush",) + LOSS_WEIGHTINGS


def critic_weight(schedule, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample x0-MSE weight [B]; "swiftbrush" = alpha^2 * the eps weight (SwiftBrush's fake loss)."""
    if weighting == "swiftbrush":
        return loss_weight(schedule, t, "eps") * schedule.alpha(t).float() ** 2
    return loss_weight(schedule, t, weighting)


@register("vsd")
@dataclass
class VSD(Objective):
    guidance_scale: float = 1.0  # CFG scale w on teacher AND fake score (Ho-Salimans; SwiftBrush 4.5; 1 = off)
    guidance_scale_max: float = 0.0  # > guidance_scale: SNOOPI random w ~ U[guidance_scale, max] per sample; 0 = fixed w
    t_min: float = 0.02  # generator-loss times t ~ U[t_min, t_max] (SwiftBrush: U{20..980})
    t_max: float = 0.98
    critic_t_min: float = 0.0  # fake-score times (SwiftBrush: U{0..999})
    critic_t_max: float = 1.0
    critic_weighting: str = "swiftbrush"  # fake-loss weight: swiftbrush (abar eps-MSE) | x0 | eps | v | flow
    p_uncond: float = 0.1  # probability of the null condition in the fake-score loss (SwiftBrush: 0.1)
    critic_ratio: int = 1  # fake-score updates per student update (SwiftBrush: 1)

    trains = ("student", "fake_score")
    ranges = {"critic_ratio": (1, None), "t_min": (0.0, "t_max"), "t_max": (0.0, 1.0), "critic_t_min": (0.0, "critic_t_max"),
              "critic_t_max": (0.0, 1.0), "p_uncond": (0.0, 1.0)}
    choices = {"critic_weighting": CRITIC_WEIGHTINGS}

    def check(self):
        super().check()
        if self.guidance_scale_max and self.guidance_scale_max < self.guidance_scale:
            raise StepdistillError(f"objective.guidance_scale_max ({self.guidance_scale_max}) must be 0 (fixed scale) or "
                                   f">= guidance_scale ({self.guidance_scale})")

    @property
    def phases(self) -> dict[str, int]:
        return {"student": 1, "fake_score": self.critic_ratio}  # SwiftBrush: student step, then LoRA step

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x, k = student_sample(nets, batch, rng, grad=True)  # [B, ...]
        t = batch.uniform(rng, self.t_min, self.t_max)  # [B]
        sched = nets.teacher.schedule
        with torch.no_grad():
            x_t = add_noise(sched, x.detach(), batch.noise(rng), t)
            w = sample_guidance(batch, rng, self.guidance_scale, max(self.guidance_scale, self.guidance_scale_max))  # [B]
            x_real = guided_per_sample(nets.teacher, x_t, t, batch.cond, batch.null_cond, w)
            x_fake = guided_per_sample(nets.fake_score, x_t, t, batch.cond, batch.null_cond, w)
            weight = (sched.alpha(t) * sched.sigma(t)).float().to(x.device)  # [B] sigma^2 in eps space
            g = expand_like(weight, x) * (x_fake.float() - x_real.float())  # SwiftBrush Alg. 1 gradient
        loss = 0.5 * F.mse_loss(x.float(), x.detach().float() - torch.nan_to_num(g))  # dL/dx = g / N
        logs = {"vsd_loss": loss.item(), "vsd_grad_norm": g.reshape(len(g), -1).norm(dim=1).mean().item(),
                "guidance_scale": w.mean().item(), "step_k": float(k)}
        return LossOut(loss, logs | sample_stats("x_real", x_real) | sample_stats("x_fake", x_fake) | sample_stats("x_student", x.detach()))

    def fake_score_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        with torch.no_grad():
            x, _ = student_sample(nets, batch, rng, grad=False)  # [B, ...]
        t = batch.uniform(rng, self.critic_t_min, self.critic_t_max)
        x_t = add_noise(nets.fake_score.schedule, x, batch.noise(rng), t)
        cond = drop_to_null(batch.cond, batch.null_cond, self.p_uncond, batch.size, rng)
        x_fake = nets.fake_score(x_t, t, cond)  # [B, ...]
        weight = critic_weight(nets.fake_score.schedule, t, self.critic_weighting).to(x.device)  # [B]
        loss = (weight * per_sample_mean((x_fake.float() - x.float()) ** 2)).mean()
        return LossOut(loss, {"fake_x0_mse": per_sample_mean((x_fake.detach().float() - x.float()) ** 2).mean().item()})
