"""LCM: latent consistency distillation along the teacher's PF-ODE (LCM / LCM-LoRA / TCD style).

Papers: "Latent Consistency Models", Luo et al., arXiv:2310.04378 (Alg. 1, Eq. 8-10);
"LCM-LoRA", arXiv:2311.05556; "Consistency Models", Song et al., arXiv:2303.01469 (Eq. 7-10).

Per sample (all in x0 space under the stepdistill contract, t in [0, 1]):

    n ~ U{1..N},  t = t_max n/N,  s = t_max (n-1)/N                  skipping-step grid (LCM: N = 50, k = 20)
    x_t = alpha_t x0 + sigma_t eps                                     x0: real data, else teacher samples
    w ~ U[w_min, w_max]                                                teacher CFG (Ho-Salimans; LCM's w + 1)
    x0_T = T(x_t, null) + w (T(x_t, c) - T(x_t, null))                 Eq. 8's augmented PF-ODE, one solver step:
    x_s = alpha_s x0_T + sigma_s (x_t - alpha_t x0_T) / sigma_t        DDIM (VP) / Euler (flow), ``ddim_step``
    f(x, t) = c_skip(t) x + c_out(t) G(x, t, c, w)                     boundary condition f(x, 0) = x (Eq. 9-10)
    L = pseudo_huber(f_theta(x_t, t), sg f_target(x_s, s))             c = ``huber_c``, 0 = L2

Target network: ``target=student`` uses the online student under stop-grad (LCM-LoRA and TCD;
no extra memory); ``target=ema`` uses the run's student EMA (LCM's theta^- with mu = 0.95: set
``student.ema_decay``). The trainer owns, checkpoints and resumes that EMA, so resume is exact;
it follows diffusers' ``EMAModel`` warm-up min(decay, (1 + n)/(10 + n)).

Guidance embedding: with ``guidance_embedding`` auto/on, a student whose diffusers model has a
guidance input (``UNet2DConditionModel(time_cond_proj_dim=...)``, e.g. a teacher folder saved
with one) receives ``timestep_cond`` = embedding of w - 1, the value ``LatentConsistencyModelPipeline``
embeds; others (LCM-LoRA style) are trained without it, so use guidance 1 at inference.
Multi-step sampling with TCD's gamma: ``stepdistill.consistency.tcd_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...consistency import consistency_fn, ddim_step
from ...contract import StepdistillError, add_noise
from ..base import Batch, LossOut, Nets, Objective
from .common import GUIDANCE_EMBEDDING, CleanSamples, add_guidance_embedding, guided_per_sample, pseudo_huber, sample_guidance
from ..registry import register


@register("lcm")
@dataclass
class LCM(Objective):
    num_ddim_steps: int = 50  # N: solver grid t_n = t_max n / N (LCM: 50 DDIM steps, skip k = 1000/50)
    t_max: float = 1.0  # top of the grid: the one-step student's time (e.g. 0.95 on a cosine-schedule eps teacher)
    guidance_scale_min: float = 1.0  # teacher CFG w ~ U[min, max], Ho-Salimans (1 = off; LCM's w in [5, 15] is [6, 16] here)
    guidance_scale_max: float = 1.0
    guidance_embedding: str = "auto"  # auto | on | off: give w to a student with a guidance input (time_cond_proj_dim)
    sigma_data: float = 0.5  # sigma_d of the boundary coefficients c_skip, c_out (LCM: 0.5)
    timestep_scaling: float = 10.0  # LCM's scaling of the native timestep in c_skip, c_out (LCMScheduler.timestep_scaling)
    huber_c: float = 0.001  # pseudo-Huber c (LCM: 0.001 in SD latent units); 0 = L2
    target: str = "student"  # student (stop-grad online student) | ema (the run's student EMA: set student.ema_decay, LCM 0.95)
    synthetic_pool: int = 512  # without data.real: teacher samples made once (fixed seed) to noise; 0 = fresh each batch
    synthetic_steps: int = 16  # teacher PF-ODE steps per synthetic sample

    ranges = {"num_ddim_steps": (1, None), "t_max": (1e-3, 1.0), "guidance_scale_min": (0.0, "guidance_scale_max"),
              "huber_c": (0.0, None)}
    choices = {"target": ("student", "ema"), "guidance_embedding": GUIDANCE_EMBEDDING}
    is_consistency = True  # f(x_t, t) -> x0 at any t on the grid: one model samples with any step count
    exports_any_step_count = True

    def setup(self):
        self._data = CleanSamples(self.synthetic_pool, self.synthetic_steps, self.guidance_scale_max)

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x0, cond, source = self._data.draw(nets, batch, rng)
        n = torch.randint(1, self.num_ddim_steps + 1, (batch.size,), generator=rng).to(batch.device)  # [B]
        t, s = self.t_max * n / self.num_ddim_steps, self.t_max * (n - 1) / self.num_ddim_steps  # [B]
        x_t = add_noise(nets.teacher.schedule, x0, batch.noise(rng), t)  # [B, ...]
        w = sample_guidance(batch, rng, self.guidance_scale_min, self.guidance_scale_max)  # [B]
        student_cond = add_guidance_embedding(cond, nets.student, w, self.guidance_embedding)
        with torch.no_grad():
            x0_teacher = guided_per_sample(nets.teacher, x_t, t, cond, batch.null_cond, w)  # Eq. 8, CFG
            x_s = ddim_step(nets.teacher.schedule, x_t, x0_teacher, t, s).to(x_t.dtype)  # one solver step
            # the target runs before the online forward: an EMA swap must not touch weights a graph holds
            target = self._target(nets, x_s, s, student_cond)
        pred = self._f(nets.student, x_t, t, student_cond)  # [B, ...], with grad
        loss = pseudo_huber(pred, target, self.huber_c).mean()
        logs = {"lcm_loss": loss.item(), "real_data": float(source == "real"),
                "pred_mean": pred.detach().mean().item(), "pred_std": pred.detach().std().item()}
        return LossOut(loss, logs)

    def _f(self, student, x, t, cond):
        return consistency_fn(student, x, t, cond, self.sigma_data, self.timestep_scaling)

    def _target(self, nets: Nets, x_s, s, cond):
        if self.target == "student":
            return self._f(nets.student, x_s, s, cond)
        ema = nets.ema_weights
        if ema is None:
            raise StepdistillError("objective.target=ema needs the student EMA: set student.ema_decay (LCM: 0.95)")
        with ema:
            return self._f(nets.student, x_s, s, cond)
