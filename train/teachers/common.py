"""Small helpers shared by the embedded-teacher training scripts (seeding, LR, EMA, augmentation).

The scripts run single-threaded on CPU by design (``torch.set_num_threads(1)``) so that a
training run leaves the other cores free and is reproducible bit for bit on one machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the scripts work from a plain checkout too
    sys.path.insert(0, str(REPO))

TORCH_THREADS = 1


def setup(seed: int) -> torch.Generator:
    """One CPU thread, every RNG seeded; returns the generator for data and noise."""
    torch.set_num_threads(TORCH_THREADS)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def base_parser(description: str, out: str, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    """--out --steps --batch --lr --seed with per-script defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=batch, help="batch size")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and noise")
    return p


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warmup, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, steps: int, warmup: int, weight_decay: float = 0.0):
    """AdamW + LambdaLR(warmup_cosine)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    return opt, sched


class EMA:
    """Exponential moving average of a model's parameters, with a warmup on the decay."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.num_updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image [N, C, H, W] by up to ``max_shift`` pixels (background -1 padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # [N, C, H+2s, W+2s]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])  # [N, C, H, W]


def batches(n: int, batch: int, generator: torch.Generator):
    """Endless random index batches (epochs of a permutation, last partial batch dropped)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


class Progress:
    """Prints step, losses and elapsed time every ``every`` steps."""

    def __init__(self, total: int, every: int = 200):
        self.total, self.every, self.start = total, every, time.time()
        self.acc: dict[str, float] = {}
        self.count = 0

    def log(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v)
        self.count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            means = " ".join(f"{k}={v / self.count:.4f}" for k, v in self.acc.items())
            print(f"step {step + 1}/{self.total} {means} elapsed={self.elapsed():.0f}s", flush=True)
            self.acc, self.count = {}, 0

    def elapsed(self) -> float:
        return time.time() - self.start


def write_json(path: Path, data: dict) -> None:
    """Pretty JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def training_record(args, seconds: float, **extra) -> dict:
    """The "training" block of stepdistill_teacher.json."""
    return {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "wall_clock_seconds": round(seconds, 1), "torch_threads": TORCH_THREADS, **extra}
