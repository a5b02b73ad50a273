"""Pieces shared by the consistency and adversarial objectives (lcm, scm, ladd).

* ``guided_per_sample``: CFG in x0 space with one scale per sample (Ho-Salimans: 1 = off).
* ``add_guidance_embedding``: LCM's guidance-scale embedding (Luo et al., arXiv:2310.04378,
  Sec. 4.2) for students that accept one: a diffusers ``UNet2DConditionModel`` built with
  ``time_cond_proj_dim`` receives ``timestep_cond`` = sinusoidal(1000 (w - 1)), exactly what
  ``LatentConsistencyModelPipeline`` feeds at inference (it embeds guidance_scale - 1, the LCM
  formulation of w). Other students (no such input) are trained without it.
* ``CleanSamples``: the clean x0 an objective noises: ``batch.real`` when the run has data
  (with its labels as the condition), else samples of the teacher's PF-ODE with CFG (made once
  into a fixed-seed pool, or fresh every batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import concat_cond
from ..contract import Cond, Denoiser, StepdistillError, expand_like
from ..training.networks import unwrap
from ..sampling import ddim_sample
from .base import Batch, Nets

GUIDANCE_EMBEDDING = ("auto", "on", "off")


def guided_per_sample(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond, null_cond: Cond | None, w: Tensor) -> Tensor:
    """x0 = x0(null) + w (x0(cond) - x0(null)), w [B]; one batched call for both branches."""
    if null_cond is None or bool((w == 1).all()):
        if not bool((w == 1).all()):
            raise StepdistillError("a guidance scale other than 1 needs a null condition, but this teacher has none")
        return denoiser(x, t, cond)
    both = denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, null_cond))  # [2B, ...]
    x_c, x_u = both.float().chunk(2)
    return x_u + expand_like(w.float(), x_u) * (x_c - x_u)


def sample_guidance(batch: Batch, rng: torch.Generator, low: float, high: float) -> Tensor:
    """Per-sample teacher guidance scale w ~ U[low, high] [B] (a fixed scale when low == high)."""
    return batch.uniform(rng, low, high) if high > low else torch.full((batch.size,), float(low), device=batch.device)


def guidance_embed_dim(denoiser: Denoiser) -> int | None:
    """``time_cond_proj_dim`` of the diffusers model behind a denoiser view, if it has one."""
    module = unwrap(getattr(denoiser, "module", denoiser))
    model = getattr(module, "model", module)
    config = getattr(model, "config", None)
    return (config.get("time_cond_proj_dim") if hasattr(config, "get") else None) or None


def add_guidance_embedding(cond: Cond, student: Denoiser, w: Tensor, mode: str) -> dict:
    """cond plus ``timestep_cond`` [B, dim] = sinusoidal(1000 (w - 1)) when the student takes it."""
    if mode not in GUIDANCE_EMBEDDING:
        raise StepdistillError(f"objective.guidance_embedding must be one of {GUIDANCE_EMBEDDING}, got {mode!r}")
    dim = guidance_embed_dim(student) if mode != "off" else None
    if mode == "on" and dim is None:
        raise StepdistillError("objective.guidance_embedding=on needs a student with a guidance input (a "
                               "UNet2DConditionModel with time_cond_proj_dim); use auto or off")
    if dim is None:
        return dict(cond)
    from diffusers.models.embeddings import get_timestep_embedding

    emb = get_timestep_embedding((w.float() - 1) * 1000, dim, flip_sin_to_cos=False, downscale_freq_shift=1)
    return dict(cond, timestep_cond=emb.to(w.device))  # [B, dim], as LatentConsistencyModelPipeline


def _index(cond: Cond, idx: Tensor) -> dict:
    return {k: (v[idx.to(v.device)] if isinstance(v, Tensor) else _index(v, idx) if isinstance(v, dict) else v)
            for k, v in cond.items()}


@dataclass
class CleanSamples:
    """Where clean samples come from: real data if the batch has it, else the teacher.

    Args:
        pool: teacher samples made once (fixed seed: resume-safe) and drawn from; 0 = fresh each batch.
        steps: teacher PF-ODE (DDIM/Euler) steps per sample.
        guidance_scale: teacher CFG baked into the samples (LADD trains on such data).
        seed: seed of the pool.
    """

    pool: int = 512
    steps: int = 16
    guidance_scale: float = 1.0
    seed: int = 4321

    def __post_init__(self):
        self._pool = None

    def draw(self, nets: Nets, batch: Batch, rng: torch.Generator) -> tuple[Tensor, dict, str]:
        """(x0 [B, ...], its cond, "real" | "teacher")."""
        if batch.real is not None:
            cond = dict(batch.cond)
            if batch.real_labels is not None and "class_labels" in cond:
                cond["class_labels"] = batch.real_labels.to(cond["class_labels"].device)
            return batch.real, cond, "real"
        if self.pool <= 0:
            x = ddim_sample(nets.teacher, batch.noise(rng), batch.cond, self.steps, batch.null_cond, self.guidance_scale)
            return x, dict(batch.cond), "teacher"
        if self._pool is None:
            self._pool = self._make_pool(nets, batch)
        x, cond = self._pool
        idx = torch.randint(0, len(x), (batch.size,), generator=rng)
        return x[idx.to(x.device)], _index(cond, idx), "teacher"

    def _make_pool(self, nets: Nets, batch: Batch) -> tuple[Tensor, dict]:
        g = torch.Generator().manual_seed(self.seed)
        xs, conds = [], []
        for start in range(0, self.pool, batch.size):
            n = min(batch.size, self.pool - start)
            if batch.conditions:
                cond, null = batch.conditions(n, g)
            else:
                cond = _index(batch.cond, torch.arange(n))
                null = None if batch.null_cond is None else _index(batch.null_cond, torch.arange(n))
            xs.append(ddim_sample(nets.teacher, batch.noise(g, n), cond, self.steps, null, self.guidance_scale))
            conds.append(cond)
        cond = {k: (torch.cat([c[k] for c in conds]) if isinstance(conds[0][k], Tensor) else conds[0][k]) for k in conds[0]}
        return torch.cat(xs), cond


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean of sqrt((a - b)^2 + c^2) - c (LCM / iCT pseudo-Huber); c = 0 gives the MSE [B]."""
    d = (a.float() - b.float()).reshape(len(a), -1)
    return (d**2).mean(1) if c == 0 else ((d**2 + c**2).sqrt() - c).mean(1)


__all__ = ["guided_per_sample", "sample_guidance", "add_guidance_embedding", "guidance_embed_dim", "CleanSamples",
           "pseudo_huber", "GUIDANCE_EMBEDDING"]
