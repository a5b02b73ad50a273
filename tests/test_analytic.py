"""The analytic teacher's denoiser against closed forms and a brute-force posterior mean."""

import pytest
import torch

from stepdistill.analytic import GaussianMixture, image_mixture, ring2d
from stepdistill.contract import add_noise
from stepdistill.schedules import FlowSchedule
from stepdistill.teachers import _ddpm_schedule


def test_single_gaussian_matches_closed_form():
    sched = FlowSchedule()
    mu, s = torch.tensor([[1.0, -2.0]]), 0.3
    gm = GaussianMixture(mu, torch.tensor([s]), torch.ones(1), sched)
    x_t, t = torch.randn(5, 2), torch.full((5,), 0.4)
    a, sig = 0.6, 0.4
    expected = mu + (a * s**2 / (a**2 * s**2 + sig**2)) * (x_t - a * mu)
    assert torch.allclose(gm(x_t, t), expected, atol=1e-5)


@pytest.mark.parametrize("schedule", [FlowSchedule, _ddpm_schedule])
def test_mixture_matches_monte_carlo_posterior_mean(schedule):
    gm = ring2d(schedule(), modes=4, std=0.3)
    g = torch.Generator().manual_seed(0)
    prior = gm.sample(400_000, g)  # [N, 2]
    x_t, t = torch.tensor([[0.7, 0.2]]), torch.tensor([0.45])
    a, s = gm.schedule.alpha(t), gm.schedule.sigma(t)
    logw = -((x_t - a * prior) ** 2).sum(1) / (2 * s**2)  # likelihood of x_t given each prior sample
    w = (logw - logw.max()).exp()
    mc = (w[:, None] * prior).sum(0) / w.sum()
    assert torch.allclose(gm(x_t, t)[0], mc, atol=0.02)


def test_limits_and_class_conditioning():
    gm = ring2d(_ddpm_schedule(), classes=True)
    x = gm.sample(64, torch.Generator().manual_seed(1))
    # t -> 0: the denoiser returns (nearly) its input; t = 1: (nearly) the data mean
    assert torch.allclose(gm(x, torch.zeros(64)), x, atol=0.02)
    assert gm(torch.randn(64, 2), torch.ones(64)).norm(dim=1).max() < 0.1
    labels = torch.full((64,), 3)
    x0 = gm(torch.randn(64, 2), torch.ones(64), {"class_labels": labels})
    assert torch.allclose(x0, gm.means[3].expand(64, 2), atol=0.05), "label 3 must pin the only component of class 3"
    null = gm(torch.randn(8, 2), torch.ones(8), {"class_labels": torch.full((8,), gm.null_class)})
    assert null.norm(dim=1).max() < 0.1, "the null label is the unconditional mixture"
    assert (gm.assign(gm.sample(500, torch.Generator().manual_seed(2), class_labels=torch.full((500,), 5))) == 5).all()


def test_image_mixture_shapes_and_denoising():
    gm = image_mixture(_ddpm_schedule())
    g = torch.Generator().manual_seed(3)
    x0 = gm.sample(16, g)
    assert x0.shape == (16, 1, 8, 8)
    t = torch.full((16,), 0.3)
    x_t = add_noise(gm.schedule, x0, torch.randn(x0.shape, generator=g), t)
    assert ((gm(x_t, t) - x0) ** 2).mean() < ((x_t - x0) ** 2).mean() / 10
    assert torch.isfinite(gm.log_prob(x0)).all()
