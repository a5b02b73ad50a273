"""Feature capture for discriminator heads: default layers per architecture, shapes, no leaks."""

from __future__ import annotations

import pytest
import torch

from stepdistill.adapters import wrap
from stepdistill.contract import StepdistillError
from stepdistill.adapters.capture import capture, default_feature_layers, feature_dims, pool_features
from stepdistill.training.networks import MLPDenoiser
from stepdistill.schedules import VPSchedule

from conftest import cond_for, tiny_dit, tiny_unet2d, tiny_unet2d_condition


def _vp():
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}


@pytest.mark.parametrize("family,factory", [("unet2d", tiny_unet2d), ("unet2d_condition", tiny_unet2d_condition), ("dit", tiny_dit)])
def test_default_layers_capture_and_release(family, factory):
    model = factory()
    den = wrap(model, _vp(), "epsilon")
    layers = default_feature_layers(den)
    assert layers, "no default layers"
    c, r = model.config.in_channels, model.config.sample_size
    x = torch.randn(2, c, r, r)
    cond = cond_for(family, 2, torch.Generator().manual_seed(0))
    dims = feature_dims(den, layers, lambda: den(x, torch.full((2,), 0.5), cond))
    assert set(dims) == set(layers)
    with capture(den, layers) as feats:
        den(x, torch.full((2,), 0.5), cond)
    pooled = [pool_features(f) for f in feats.values()]
    assert all(p.shape[0] == 2 and p.ndim == 2 for p in pooled)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0, "hooks left behind after capture"


def test_mlp_and_bad_layer():
    net = MLPDenoiser((2,), VPSchedule.from_config(_vp()), hidden=16, depth=2)
    assert default_feature_layers(net) == ["body"]
    with capture(net, ["body"]) as feats:
        net(torch.randn(3, 2), torch.full((3,), 0.3))
    assert feats["body"].shape == (3, 16)
    with pytest.raises(StepdistillError, match="not found"):
        with capture(net, ["nope"]):
            pass
