"""Pieces shared by the score-distillation objectives (dmd2, vsd, sid).

* ``student_sample``: one student sample per update for K-step students, by DMD2's backward
  simulation (Yin et al. 2024, arXiv:2405.14867, Sec. 4.5): draw a step index k ~ U{0..K-1},
  run steps 0..k-1 from fresh noise without grad (x0 re-noised to the next time with fresh
  noise), run step k with grad, return its x0. Few-step SiD's "uniform mixture of step outputs"
  (arXiv:2505.12674) is the same draw (K_rand = k + 1). Only step k carries gradient.
* ``drop_to_null``: replace each sample's condition by the null condition with probability p
  (SwiftBrush / SiD-LSG train the fake score's unconditional branch this way, so it can be used
  with CFG).
* ``frozen``: the view without its DDP wrapper, for calls whose weights are frozen this phase
  but whose input needs a graph (SiD's teacher/fake calls, DMD2's generator GAN term); DDP's
  reducer must only see the networks the phase updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...contract import Cond, Denoiser, expand_like
from ...training.networks import Net, unwrap
from ...sampling import few_step_sample
from ..base import Batch, Nets


def sample_step_index(num_steps: int, rng: torch.Generator, device) -> int:
    """k ~ U{0..K-1} (0 for one-step students, no draw); rank 0's draw on every process."""
    if num_steps <= 1:
        return 0
    k = torch.randint(0, num_steps, (1,), generator=rng)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        k = k.to(device)
        torch.distributed.broadcast(k, 0)  # FSDP: every rank must run the same number of forwards
    return int(k)


def student_sample(nets: Nets, batch: Batch, rng: torch.Generator, grad: bool) -> tuple[Tensor, int]:
    """(x0 of the student's step k [B, ...], k): backward simulation, grad on step k only."""
    k = sample_step_index(len(nets.student_times), rng, batch.device)
    x = few_step_sample(nets.student, batch.noise(rng), batch.cond, nets.student_times, rng, grad=grad, stop_after=k)
    return x, k


def _where(mask: Tensor, a: Cond, b: Cond) -> dict:
    out = {}
    for key, value in b.items():
        if isinstance(value, Tensor):
            out[key] = torch.where(expand_like(mask.to(value.device), value), a[key], value)
        elif isinstance(value, dict):
            out[key] = _where(mask, a[key], value)
        else:
            out[key] = value
    return out


def drop_to_null(cond: Cond, null_cond: Cond | None, p: float, n: int, rng: torch.Generator) -> dict:
    """cond with each of its n samples replaced by the null condition with probability p."""
    if null_cond is None or p <= 0:
        return dict(cond)
    drop = torch.rand(n, generator=rng) < p  # [n]
    return _where(drop, null_cond, cond)


def frozen(view: Denoiser) -> Denoiser:
    """The same denoiser, called on the unwrapped module (no DDP reducer)."""
    return Net(unwrap(view.module), view.schedule, view.adapter) if isinstance(view, Net) else view


__all__ = ["sample_step_index", "student_sample", "drop_to_null", "frozen"]
