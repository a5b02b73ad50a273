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
