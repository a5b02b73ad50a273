"""What every objective sees: the networks, a batch, and what it returns.

An objective is a small dataclass holding its hyperparameters. It declares which networks it
trains and its phases, and computes losses as pure functions. It never calls ``backward``,
steps an optimizer, moves devices, casts precision, saves files or loads models: the trainer
does all of that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..contract import Denoiser


@dataclass
class Nets:
    """The networks an objective may call. ``student`` and ``fake_score`` may share a base."""

    teacher: Denoiser  # frozen, never receives gradients
    student: Denoiser  # the generator's denoiser, evaluated at ``student_times``
    student_times: tuple[float, ...] = (1.0,)  # generation times, descending; (1.0,) = one step
    fake_score: Denoiser | None = None  # online score of the student's samples
    extra: dict[str, nn.Module] = field(default_factory=dict)  # e.g. discriminator heads
    ema_weights: object | None = None  # context manager: swaps the student's EMA weights in (student.ema_decay > 0)


@dataclass
class Batch:
    """One batch of conditions (and optional real data)."""

    size: int
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (2,) or (4, 8, 8)
    cond: dict
    null_cond: dict | None = None  # matching unconditional input for CFG
    real: Tensor | None = None  # [B, *sample_shape] real samples, for objectives that use data
    conditions: Callable[[int, torch.Generator], tuple[dict, dict | None]] | None = None  # fresh conds
    device: torch.device | str = "cpu"
    real_labels: Tensor | None = None  # [B] class labels of ``real``, when the data has them

    def noise(self, generator: torch.Generator, n: int | None = None) -> Tensor:
        """Unit Gaussian noise [n, *sample_shape], drawn on CPU from ``generator`` (reproducible)."""
        return torch.randn(n or self.size, *self.sample_shape, generator=generator).to(self.device)

    def uniform(self, generator: torch.Generator, low: float, high: float, n: int | None = None) -> Tensor:
        """Per-sample times t ~ U[low, high] [n]."""
        return (low + (high - low) * torch.rand(n or self.size, generator=generator)).to(self.device)


@dataclass
class LossOut:
    """A scalar loss plus detached floats to log."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    trains: tuple[str, ...]  # networks it updates, e.g. ("student", "fake_score")
    phases: dict[str, int]  # phase -> updates per round, e.g. {"fake_score": 5, "student": 1}

    def phase_updates(self, phase: str) -> tuple[str, ...]:
        """Which networks a phase updates."""
        ...

    def loss(self, phase: str, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut: ...

    # Optional: ``extra_networks(teacher) -> dict[name, nn.Module]`` builds trainable networks of
    # the objective's own (e.g. discriminator heads). Their names appear in ``trains``; the trainer
    # gives each an optimizer from the run's ``discriminator`` section, prepares, checkpoints and
    # isolates them like the student, and passes them to ``loss`` as ``nets.extra[name]``.
