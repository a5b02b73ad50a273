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


@dataclass
class SignalObjective:
    """A student-only objective that sends this process ``signal_name`` at update ``at``."""

    at: int = 3
    signal_name: str = "SIGTERM"
    trains: tuple = field(default=("student",), init=False)
    phases: dict = field(default_factory=lambda: {"student": 1}, init=False)

    def phase_updates(self, phase):
        return (phase,)

    def __post_init__(self):
        self._calls = 0  # a counter, not a hyperparameter (the run's config must not change)

    def loss(self, phase, nets, batch, rng):
        import os
        import signal

        self._calls += 1
        if self._calls == self.at:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        x = nets.student(batch.noise(rng), torch.ones(batch.size), batch.cond)
        return LossOut((x**2).mean())


@dataclass
class HeadObjective:
    """Student phase + a "head" phase that trains an extra network built by the objective."""

    trains: tuple = field(default=("student", "head"), init=False)
    phases: dict = field(default_factory=lambda: {"head": 1, "student": 1}, init=False)

    def phase_updates(self, phase):
        return (phase,)

    def extra_networks(self, teacher):
        import math

        return {"head": torch.nn.Linear(math.prod(teacher.sample_shape), 1)}

    def loss(self, phase, nets, batch, rng):
        x = nets.student(batch.noise(rng), torch.ones(batch.size), batch.cond)
        if phase == "head":
            x = x.detach()
        score = nets.extra["head"](x.reshape(batch.size, -1).float())
        return LossOut(torch.nn.functional.softplus(score if phase == "head" else -score).mean())


@dataclass
class EnvKillObjective:
    """A student-only objective that SIGKILLs its process at update ``$STEPDISTILL_TEST_KILL_AT`` (if set).

    The kill point lives outside the config, so a killed run and an uninterrupted one share
    their config and can be compared loss for loss.
    """

    trains: tuple = field(default=("student",), init=False)
    phases: dict = field(default_factory=lambda: {"student": 1}, init=False)

    def phase_updates(self, phase):
        return (phase,)

    def __post_init__(self):
        self._calls = 0

    def loss(self, phase, nets, batch, rng):
        import os
        import signal

        self._calls += 1
        if str(self._calls) == os.environ.get("STEPDISTILL_TEST_KILL_AT"):
            os.kill(os.getpid(), signal.SIGKILL)
        x = nets.student(batch.noise(rng), batch.uniform(rng, 0.5, 1.0), batch.cond)
        return LossOut(((x - 1) ** 2).mean())
