"""What every objective sees: the networks, a batch, and what it returns.

An objective is a small dataclass holding its hyperparameters. It declares which networks it
trains and its phases, and computes losses as pure functions. It never calls ``backward``,
steps an optimizer, moves devices, casts precision, saves files or loads models: the trainer
does all of that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..contract import Denoiser
from ..validation import check_choice, check_range


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


class Objective:
    """Base of every objective: defaults for the parts the papers do not differ in.

    A subclass is a ``@dataclass`` whose fields are its hyperparameters. It declares:

    * ``trains``: the networks it updates (default: the student); ``phases``: phase -> updates per
      round (default ``{"student": 1}``), a property when a hyperparameter sets a count;
    * one ``<phase>_loss(nets, batch, rng) -> LossOut`` method per phase (``loss`` dispatches);
    * ``ranges`` / ``choices``: the checks of its fields (run after ``__init__``, one-line errors);
    * capabilities as attributes: ``is_consistency`` (a consistency function: maps any time to
      x0) and ``exports_any_step_count`` (export may write other step counts than trained).

    Optional members with defaults: ``phase_updates`` (a phase updates the network it is named
    after), ``extra_networks`` (none), ``graph_nets`` (each phase keeps its updated networks'
    activations), ``setup`` (per-run state after the checks).
    """

    trains: tuple[str, ...] = ("student",)  # networks it updates, e.g. ("student", "fake_score")
    phases: dict[str, int] = {"student": 1}  # phase -> updates per round, e.g. {"fake_score": 5, "student": 1}
    ranges: dict[str, tuple] = {}  # field -> (low, high); None = unbounded, a str names another field
    choices: dict[str, tuple] = {}  # field -> allowed values
    is_consistency: bool = False  # a consistency function f(x_t, t) -> x0 for any t (LCM, sCM)
    exports_any_step_count: bool = False  # export may write step counts other than the trained ones

    def __post_init__(self):
        self.check()
        self.setup()

    def check(self) -> None:
        """Range and choice checks of the fields (``objective.<field>`` in the error)."""
        for name, (low, high) in self.ranges.items():
            check_range(f"objective.{name}", getattr(self, name), self._bound(low), self._bound(high))
        for name, allowed in self.choices.items():
            check_choice(f"objective.{name}", getattr(self, name), allowed)

    def _bound(self, bound):
        return getattr(self, bound) if isinstance(bound, str) else bound

    def setup(self) -> None:
        """State that is not a hyperparameter (pools, counters); runs after the checks."""

    def phase_updates(self, phase: str) -> tuple[str, ...]:
        """Which networks a phase updates (default: the one it is named after)."""
        return (phase,)

    @property
    def graph_nets(self) -> dict[str, tuple[str, ...]]:
        """Activations kept per phase, for ``stepdistill plan`` (default: the phase's updated networks)."""
        return {p: tuple(self.phase_updates(p)) for p in self.phases}

    def extra_networks(self, teacher) -> dict[str, nn.Module]:
        """Trainable networks of the objective's own (e.g. discriminator heads), named in ``trains``.

        The trainer gives each an optimizer from the run's ``discriminator`` section, prepares,
        checkpoints and isolates them like the student, and passes them as ``nets.extra[name]``.
        """
        return {}

    def loss(self, phase: str, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        """The loss of one update of ``phase``: ``self.<phase>_loss(nets, batch, rng)``."""
        method = getattr(self, f"{phase}_loss", None) if phase in self.phases else None
        if method is None:
            raise ValueError(f"{type(self).__name__} has no phase {phase!r}")
        return method(nets, batch, rng)
