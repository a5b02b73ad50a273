"""Train a toy2d recipe and measure its one-step student against the analytic teacher (tests, eval/bench_toy.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def ring_convergence(recipe: str, run_dir, samples: int = 4000) -> tuple[float, float, Tensor, float, float]:
    """Train a shipped toy2d recipe; measure its one-step student before and after.

    Returns (sliced W2 to exact teacher samples before, after, nearest-mode shares [8], fraction
    of samples within 0.5 of a mode, CPU seconds of the training loop in this process). The CPU
    time is for benchmarks (``eval/bench_toy.py``), never for a test's assertion.
    """
    import time

    from ..config import load_config
    from ..evaluation.toy import mode_shares, sliced_wasserstein
    from .trainer import Trainer

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
