"""The objectives base: phase dispatch, declared range/choice checks, capabilities as attributes."""

from dataclasses import dataclass

import pytest
import torch

from stepdistill.contract import StepdistillError
from stepdistill.objectives import LossOut, Objective, registered
from stepdistill.objectives.compose import Compose
from stepdistill.objectives.score.dmd import DMD
from stepdistill.objectives.consistency.lcm import LCM
from stepdistill.objectives.consistency.scm import SCM


@dataclass
class Toy(Objective):
    low: float = 0.1  # must stay <= high
    high: float = 0.9
    mode: str = "a"
    ranges = {"low": (0.0, "high"), "high": (0.0, 1.0)}
    choices = {"mode": ("a", "b")}
    trains = ("student", "critic")

    @property
    def phases(self):
        return {"critic": 2, "student": 1}

    def critic_loss(self, nets, batch, rng):
        return LossOut(torch.tensor(1.0))

    def student_loss(self, nets, batch, rng):
        return LossOut(torch.tensor(2.0))


def test_loss_dispatches_on_the_phase_name_and_rejects_others():
    toy = Toy()
    assert toy.loss("critic", None, None, None).loss.item() == 1.0
    assert toy.loss("student", None, None, None).loss.item() == 2.0
    with pytest.raises(ValueError, match="Toy has no phase 'fake_score'"):
        toy.loss("fake_score", None, None, None)


def test_declared_ranges_and_choices_are_checked_with_one_line_errors():
    with pytest.raises(StepdistillError, match=r"objective.low = 0.95 is out of range \[0.0, 0.9\]") as e:
        Toy(low=0.95)  # the upper bound is another field's value
    assert "\n" not in str(e.value)
    with pytest.raises(StepdistillError, match="objective.high = nan is not a finite number"):
        Toy(high=float("nan"))
    with pytest.raises(StepdistillError, match="objective.mode must be one of a, b; got 'c'"):
        Toy(mode="c")
    with pytest.raises(StepdistillError, match="objective.t_min = 0.99 is out of range"):
        DMD(t_min=0.99)  # a built-in's declared check
    with pytest.raises(StepdistillError, match="objective.target must be one of student, ema"):
        LCM(target="teacher")


def test_defaults_for_optional_members():
    toy = Toy()
    assert toy.phase_updates("critic") == ("critic",) and toy.extra_networks(None) == {}
    assert toy.graph_nets == {"critic": ("critic",), "student": ("student",)}
    assert not toy.is_consistency and not toy.exports_any_step_count
    assert DMD().extra_networks(None) == {}


def test_capabilities_are_attributes_and_compose_derives_them():
    assert LCM.is_consistency and SCM.is_consistency and LCM.exports_any_step_count and SCM.exports_any_step_count
    assert not DMD.is_consistency and not DMD().exports_any_step_count
    sprint = Compose(parts=[{"name": "scm", "weight": 1.0}, {"name": "ladd", "weight": 0.1}])
    assert sprint.is_consistency and sprint.exports_any_step_count
    gan = Compose(parts=[{"name": "dmd2"}, {"name": "ladd"}])
    assert not gan.is_consistency and not gan.exports_any_step_count


def test_built_in_objectives_stand_on_the_base():
    for name, cls in registered().items():
        assert issubclass(cls, Objective), name
