"""SiD: Score identity Distillation (and its guided and few-step variants).

Papers: "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
Models for One-Step Generation", Zhou et al., ICML 2024, arXiv:2404.04057 (Eq. 21-23, Alg. 1);
guidance from SiD-LSG, arXiv:2406.01561 (Sec. 4); Zero-/Anti-CFG and the uniform-mixture few-step
training from arXiv:2505.12674 and SiD-DiT (arXiv:2509.25127).

Student phase (mode B: the teacher and fake calls are IN the graph w.r.t. x; their weights are
frozen by the trainer's per-phase isolation, so only the student's weights get gradients):

    x = G(z)  (with grad);  t ~ U[t_min, t_max];  x_t = alpha_t x + sigma_t eps   (graph through x)
    x_r = T(x_t, t, c; kappa4),  x_f = F(x_t, t, c; kappa2)                      (graph through x_t)
    L = lambda(x, t) * (x_r - x_f) . ((x_r - x) - alpha (x_r - x_f))              SiD Eq. 23 (alpha = 1.2)
      = lambda * [ (1 - alpha) |x_r - x_f|^2 + (x_r - x_f) . (x_f - x) ]
    lambda = 1 / sg(max(mean_{C,H,W} |x - x_r|, 1e-5))    ("sid"; SiD-DiT's "one_minus_sigma": 1 - sigma_t)
    reduced as mean over elements x loss_scale ("mean"), or sum over elements / B x loss_scale ("sum",
    SiD's own: loss_scaling_G = 100 with "sum").

Fake-score phase (SiD Alg. 1, SiD-LSG Eq. 11): DSM on sg(x) with the fake's own guidance kappa1
and null-condition dropout p_uncond (applied when any fake scale != 1, as SiD-LSG):

    L_F = mean(lambda_F(t) |F(x_t, t, c'; kappa1) - x|^2)

Guidance variants (reference 7.3-7.4), all through the three scales:

    | variant   | guidance_scale (kappa4) | fake_guidance_scale (kappa2) | fake_train_guidance_scale (kappa1) |
    | none      | 1                       | 1                            | 1                                  |
    | CFG (LSG) | w (1.5-4.5)             | w                            | w                                  |
    | Zero-CFG  | 1                       | 0 (unconditional fake)       | 1                                  |
    | Anti-CFG  | 1                       | < 0 (e.g. -1) [unverified]   | 1                                  |

Few-step students: a uniform mixture of the step outputs (arXiv:2505.12674): k ~ U{0..K-1} per
update, steps before k without grad, step k with grad (``score_common.student_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...conditioning import guided
from ...contract import add_noise, expand_like
from ...schedules import LOSS_WEIGHTINGS, loss_weight
from ..base import Batch, LossOut, Nets, Objective
from .dmd import per_sample_mean, sample_stats
from ..registry import register
from .common import drop_to_null, frozen, student_sample

WEIGHTINGS = ("sid", "one_minus_sigma", "none")


@register("sid")
@dataclass
class SiD(Objective):
    alpha: float = 1.2  # SiD's alpha (Eq. 23): 1.2 EDM, 1.0 SiD-LSG
    guidance_scale: float = 1.0  # kappa4: teacher CFG in the generator loss (1 = off)
    fake_guidance_scale: float = 1.0  # kappa2: fake CFG in the generator loss; 0 = Zero-CFG, < 0 = Anti-CFG
    fake_train_guidance_scale: float = 1.0  # kappa1: fake CFG inside its own DSM loss (SiD-LSG)
    p_uncond: float = 0.1  # null-condition dropout in the fake loss, used when any fake scale != 1 (SiD-LSG: 0.1)
    t_min: float = 0.02  # generator-loss times t ~ U[t_min, t_max] (SiD-LSG: U{20..979})
    t_max: float = 0.98
    critic_t_min: float = 0.02  # fake-score DSM times
    critic_t_max: float = 0.98
    critic_weighting: str = "eps"  # fake DSM x0-MSE weight: x0 | eps | v | flow (SiD-LSG: eps-MSE)
    weighting: str = "sid"  # generator weight: sid (1/mean|x - x_r|) | one_minus_sigma (SiD-DiT) | none
    normaliser_min: float = 1e-5  # clip of mean|x - x_r| (SiD)
    reduction: str = "mean"  # mean over elements | sum (over elements, mean over batch: SiD's code)
    loss_scale: float = 1.0  # generator loss multiplier (SiD: 100 with reduction sum; SiD-LSG: 1)
    critic_ratio: int = 1  # fake-score updates per student update (SiD: 1)

    trains = ("student", "fake_score")
    ranges = {"critic_ratio": (1, None), "t_min": (0.0, "t_max"), "t_max": (0.0, 1.0), "critic_t_min": (0.0, "critic_t_max"),
              "critic_t_max": (0.0, 1.0), "p_uncond": (0.0, 1.0), "normaliser_min": (0.0, None)}
    choices = {"weighting": WEIGHTINGS, "reduction": ("mean", "sum"), "critic_weighting": LOSS_WEIGHTINGS}

    @property
    def phases(self) -> dict[str, int]:
        return {"fake_score": self.critic_ratio, "student": 1}  # SiD Alg. 1: fake update, then G update

    @property
    def graph_nets(self) -> dict[str, tuple[str, ...]]:
        """Activations kept per phase (``stepdistill plan``): the G loss backprops through T and F."""
        return {"fake_score": ("fake_score",), "student": ("student", "teacher", "fake_score")}

    @property
    def fake_dropout(self) -> float:
        guided_fake = self.fake_guidance_scale != 1 or self.fake_train_guidance_scale != 1
        return self.p_uncond if guided_fake else 0.0

    def generator_weight(self, sched, x, x_real, t) -> torch.Tensor:
        """lambda(x, t) [B], without gradient."""
        if self.weighting == "sid":
            return 1 / per_sample_mean((x.detach().float() - x_real.detach().float()).abs()).clamp_min(self.normaliser_min)
        if self.weighting == "one_minus_sigma":
            return (1 - sched.sigma(t).float()).to(x.device)
        return torch.ones(len(x), device=x.device)

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x, k = student_sample(nets, batch, rng, grad=True)  # [B, ...]
        t = batch.uniform(rng, self.t_min, self.t_max)  # [B]
        teacher, fake = frozen(nets.teacher), frozen(nets.fake_score)
        x_t = add_noise(teacher.schedule, x, batch.noise(rng), t)  # graph through x
        x_r = guided(teacher, x_t, t, batch.cond, batch.null_cond, self.guidance_scale).float()  # graph through x_t
        x_f = guided(fake, x_t, t, batch.cond, batch.null_cond, self.fake_guidance_scale).float()
        lam = self.generator_weight(teacher.schedule, x, x_r, t)  # [B]
        diff = x_r - x_f
        per_elem = expand_like(lam, x) * diff * ((x_r - x.float()) - self.alpha * diff)  # SiD Eq. 23
        per_elem = torch.nan_to_num(per_elem)
        loss = per_elem.mean() if self.reduction == "mean" else per_elem.reshape(len(x), -1).sum(1).mean()
        loss = self.loss_scale * loss
        logs = {"sid_loss": loss.item(), "score_gap": diff.detach().reshape(len(x), -1).norm(dim=1).mean().item(),
                "step_k": float(k)}
        return LossOut(loss, logs | sample_stats("x_real", x_r.detach()) | sample_stats("x_fake", x_f.detach()) | sample_stats("x_student", x.detach()))

    def fake_score_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        with torch.no_grad():
            x, _ = student_sample(nets, batch, rng, grad=False)  # [B, ...]
        t = batch.uniform(rng, self.critic_t_min, self.critic_t_max)
        x_t = add_noise(nets.fake_score.schedule, x, batch.noise(rng), t)
        cond = drop_to_null(batch.cond, batch.null_cond, self.fake_dropout, batch.size, rng)
        x_fake = guided(nets.fake_score, x_t, t, cond, batch.null_cond, self.fake_train_guidance_scale)  # SiD-LSG Eq. 11
        weight = loss_weight(nets.fake_score.schedule, t, self.critic_weighting).to(x.device)  # [B]
        loss = (weight * per_sample_mean((x_fake.float() - x.float()) ** 2)).mean()
        return LossOut(loss, {"fake_x0_mse": per_sample_mean((x_fake.detach().float() - x.float()) ** 2).mean().item()})
