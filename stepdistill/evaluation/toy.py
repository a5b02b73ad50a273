"""Distances for low-dimensional samples against an analytic teacher."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point clouds [N, D] (random unit directions)."""
    if len(x) != len(y):
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # [D, P]
    px = (x.float().cpu() @ dirs).sort(0).values  # [N, P]
    py = (y.float().cpu() @ dirs).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())


def mode_shares(samples: Tensor, means: Tensor, max_dist: float | None = None) -> Tensor:
    """Fraction of samples whose nearest mode is k [K]; samples farther than max_dist from
    every mode count for none (so the shares can sum to less than 1)."""
    d = torch.cdist(samples.reshape(len(samples), -1).float().cpu(), means.reshape(len(means), -1).float().cpu())
    nearest = d.argmin(1)
    if max_dist is not None:
        nearest = torch.where(d.min(1).values <= max_dist, nearest, torch.full_like(nearest, -1))
    return torch.stack([(nearest == k).float().mean() for k in range(len(means))])


def ring_convergence(recipe: str, run_dir, samples: int = 4000) -> tuple[float, float, Tensor, float, float]:
    """Train a shipped toy2d recipe; measure its one-step student before and after.

    Returns (sliced W2 to exact teacher samples before, after, nearest-mode shares [8], fraction
    of samples within 0.5 of a mode, CPU seconds of the training loop in this process). The CPU
    time is for benchmarks (``eval/bench_toy.py``), never for a test's assertion.
    """
    import time

    from ..config import load_config
    from ..training.trainer import Trainer

    cfg = load_config(recipe, ["train.sample_every=0", "train.checkpoint_every=0", "train.log_every=100000"])
    trainer = Trainer(cfg, run_dir, progress=False)
    gm = trainer.teacher.denoiser
    reference = gm.sample(samples, torch.Generator().manual_seed(7))
    before = sliced_wasserstein(trainer.generate(samples, seed=3), reference)
    start = time.process_time()
    trainer.run()
    cpu_seconds = time.process_time() - start
    x = trainer.generate(samples, seed=3)
    after = sliced_wasserstein(x, reference)
    shares = mode_shares(x, gm.means)  # [8], nearest-mode assignment
    near = mode_shares(x, gm.means, max_dist=0.5).sum().item()  # within 0.5 (~6 std) of a mode
    return before, after, shares, near, cpu_seconds
