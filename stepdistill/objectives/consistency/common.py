"""Pieces shared by the consistency and adversarial objectives (lcm, scm, ladd).

* ``guided_per_sample``: CFG in x0 space with one scale per sample (Ho-Salimans: 1 = off).
* ``add_guidance_embedding``: LCM's guidance-scale embedding (Luo et al., arXiv:2310.04378,
  Sec. 4.2) for students that accept one: a diffusers ``UNet2DConditionModel`` built with
  ``time_cond_proj_dim`` receives ``timestep_cond`` = sinusoidal(1000 (w - 1)), exactly what
  ``LatentConsistencyModelPipeline`` feeds at inference (it embeds guidance_scale - 1, the LCM
  formulation of w). Other students (no such input) are trained without it.
* ``CleanSamples``: the clean x0 an objective noises: ``batch.real`` when the run has data
  (with its labels as the condition), else samples of the teacher's PF-ODE with CFG (a fixed-seed pool
  built lazily, chunk by chunk, as batches need it; or fresh every batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...conditioning import concat_cond
from ...contract import Cond, Denoiser, StepdistillError, expand_like
from ...training.networks import unwrap
from ...sampling import ddim_sample
from ..base import Batch, Nets

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

    The teacher pool is built lazily, in chunks: chunk k holds ``batch.size`` PF-ODE samples made
    with its own generator (seeded from ``seed`` and k), so its content never depends on when it
    was built or which chunks exist. A batch takes the samples of randomly chosen chunks (drawn
    with the training generator, which the checkpoint saves), building only those it lacks; the
    pool grows to ``pool`` samples over rounds, and a resumed run draws exactly what the original
    did. A tqdm bar shows builds of many samples at once (a batch larger than the chunk size).

    Args:
        pool: teacher samples to keep (rounded up to whole chunks); 0 = fresh samples every batch.
        steps: teacher PF-ODE (DDIM/Euler) steps per sample.
        guidance_scale: teacher CFG baked into the samples (LADD trains on such data).
        seed: seed of the pool.
        chunk: samples per chunk (0 = the batch size; at most the pool).
    """

    pool: int = 512
    steps: int = 16
    guidance_scale: float = 1.0
    seed: int = 4321
    chunk: int = 0

    def __post_init__(self):
        self._chunks: dict[int, tuple[Tensor, dict]] = {}

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
        size = min(self.chunk or batch.size, self.pool)
        n_chunks = -(-self.pool // size)
        need = min(-(-batch.size // size), n_chunks)
        picked = torch.randperm(n_chunks, generator=rng)[:need].tolist()
        self._build([k for k in picked if k not in self._chunks], size, nets, batch)
        x = torch.cat([self._chunks[k][0] for k in picked])  # [need * size, ...]
        cond = self._chunks[picked[0]][1]
        for k in picked[1:]:
            cond = concat_cond(cond, self._chunks[k][1])
        idx = (torch.randperm(len(x), generator=rng) if len(x) >= batch.size
               else torch.randint(0, len(x), (batch.size,), generator=rng))[:batch.size]  # pool smaller than a batch
        return x[idx.to(x.device)], _index(cond, idx), "teacher"

    def built(self) -> int:
        """Teacher samples made so far."""
        return sum(len(x) for x, _ in self._chunks.values())

    def _build(self, chunks: list[int], size: int, nets: Nets, batch: Batch) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * size, desc="teacher sample pool", unit="sample", leave=False,
                   disable=len(chunks) * size < 64)
        for k in chunks:
            self._chunks[k] = self._make_chunk(k, size, nets, batch)
            bar.update(size)
        bar.close()

    def _make_chunk(self, k: int, n: int, nets: Nets, batch: Batch) -> tuple[Tensor, dict]:
        """Chunk k: n teacher samples from a generator seeded by (seed, k) alone."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        if batch.conditions:
            cond, null = batch.conditions(n, g)
        else:  # a fixed condition (no sampler): the batch's own rows
            rows = torch.arange(n) % batch.size
            cond = _index(batch.cond, rows)
            null = None if batch.null_cond is None else _index(batch.null_cond, rows)
        with torch.no_grad():
            x = ddim_sample(nets.teacher, batch.noise(g, n), cond, self.steps, null, self.guidance_scale)
        return x.detach(), cond


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean of sqrt((a - b)^2 + c^2) - c (LCM / iCT pseudo-Huber); c = 0 gives the MSE [B]."""
    d = (a.float() - b.float()).reshape(len(a), -1)
    return (d**2).mean(1) if c == 0 else ((d**2 + c**2).sqrt() - c).mean(1)


__all__ = ["guided_per_sample", "sample_guidance", "add_guidance_embedding", "guidance_embed_dim", "CleanSamples",
           "pseudo_huber", "GUIDANCE_EMBEDDING"]
