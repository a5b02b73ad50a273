"""The registry, and DMD's generator gradient against its formula on the analytic teacher."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from stepdistill.analytic import ring2d
from stepdistill.contract import StepdistillError, add_noise
from stepdistill.objectives import Batch, Nets, get_objective_class, register, registered
from stepdistill.objectives.score.dmd import DMD
from stepdistill.teachers import _ddpm_schedule


def test_registry_rejects_duplicates_and_accepts_dotted_paths():
    assert registered()["dmd"] is DMD
    with pytest.raises(StepdistillError, match="already registered"):

        @register("dmd")
        @dataclass
        class Other:
            pass

    assert get_objective_class("nan_objective.NaNObjective").__name__ == "NaNObjective"
    with pytest.raises(StepdistillError, match="did you mean 'dmd'"):
        get_objective_class("dnd")
    with pytest.raises(StepdistillError, match="cannot import objective"):
        get_objective_class("no_such_module.Thing")
    with pytest.raises(StepdistillError, match="must be a dataclass"):
        register("plain")(type("Plain", (), {}))


class FixedSamples(nn.Module):
    """A 'student' whose output is a learnable tensor, whatever its input."""

    def __init__(self, x, schedule):
        super().__init__()
        self.x, self.schedule = nn.Parameter(x.clone()), schedule

    def forward(self, x_t, t, cond=None):
        return self.x


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_dmd_generator_gradient_matches_formula(guidance_scale):
    sched = _ddpm_schedule()
    teacher = ring2d(sched, classes=True)
    fake = ring2d(sched, radius=1.5, std=0.2, classes=True)  # a known, different denoiser
    g0 = torch.Generator().manual_seed(0)
    student = FixedSamples(torch.randn(16, 2, generator=g0) * 2, sched)
    labels = torch.randint(0, 8, (16,), generator=g0)
    batch = Batch(16, (2,), {"class_labels": labels}, {"class_labels": torch.full((16,), 8)})
    nets = Nets(teacher=teacher, student=student, fake_score=fake)
    obj = DMD(guidance_scale=guidance_scale)
    rng = torch.Generator().manual_seed(1)
    state = rng.get_state()
    out = obj.loss("student", nets, batch, rng)
    (grad,) = torch.autograd.grad(out.loss, student.x)
    # replay the same draws and apply the formula by hand
    replay = torch.Generator().set_state(state)
    batch.noise(replay)  # the student's input noise
    t = batch.uniform(replay, obj.t_min, obj.t_max)
    x = student.x.detach()
    x_t = add_noise(sched, x, batch.noise(replay), t)
    x_c, x_u = teacher(x_t, t, batch.cond), teacher(x_t, t, batch.null_cond)
    x_real = x_u + guidance_scale * (x_c - x_u) if guidance_scale != 1 else x_c
    x_fake = fake(x_t, t, batch.cond)
    w = 1 / ((x - x_real).abs().mean(1, keepdim=True) + obj.normaliser_eps)
    expected = (x_fake - x_real) * w / x.numel()  # d/dx of 1/2 mean((x - sg(x - g))^2) = g / N
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert out.logs["dm_grad_norm"] > 0


def test_dmd_fake_score_loss_is_weighted_dsm():
    sched = _ddpm_schedule()
    fake = ring2d(sched)
    student = FixedSamples(torch.randn(8, 2), sched)
    batch = Batch(8, (2,), {}, None)
    nets = Nets(teacher=fake, student=student, fake_score=fake)
    for weighting in ("x0", "eps"):
        rng = torch.Generator().manual_seed(2)
        state = rng.get_state()
        loss = DMD(critic_weighting=weighting).loss("fake_score", nets, batch, rng).loss
        replay = torch.Generator().set_state(state)
        batch.noise(replay)
        t = batch.uniform(replay, 0.02, 0.98)
        x = student.x.detach()
        x_t = add_noise(sched, x, batch.noise(replay), t)
        lam = torch.ones(8) if weighting == "x0" else (sched.alpha(t) / sched.sigma(t)) ** 2
        assert torch.allclose(loss, (lam * ((fake(x_t, t) - x) ** 2).mean(1)).mean(), rtol=1e-5)


def test_dmd_validates_hyperparameters():
    with pytest.raises(StepdistillError, match="critic_ratio"):
        DMD(critic_ratio=0)
    with pytest.raises(StepdistillError, match="critic_weighting"):
        DMD(critic_weighting="snr")
