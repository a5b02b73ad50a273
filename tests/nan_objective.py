"""Test objectives reachable by dotted path (``objective.name=nan_objective.NaNObjective``)."""

from dataclasses import dataclass, field

import torch

from stepdistill.objectives.base import LossOut


@dataclass
class NaNObjective:
    """Trains the student with a loss that is NaN from update ``after`` on."""

    after: int = 0
    trains: tuple = field(default=("student",), init=False)
    phases: dict = field(default_factory=lambda: {"student": 1}, init=False)

    def phase_updates(self, phase):
        return (phase,)

    def loss(self, phase, nets, batch, rng):
        x = nets.student(batch.noise(rng), torch.ones(batch.size), batch.cond)
        self.after -= 1
        return LossOut(x.mean() * (float("nan") if self.after < 0 else 1.0))
