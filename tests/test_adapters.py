"""Contract tests: every adapter family x prediction type round-trips x0 -> target -> x0 to 1e-5."""

import pytest
import torch

from conftest import cond_for, tiny_dit, tiny_sana, tiny_sd3, tiny_unet2d, tiny_unet2d_condition
from stepdistill.adapters import DiffusersDenoiser, family_of, prediction_to_x0, x0_to_prediction
from stepdistill.contract import StepdistillError, add_noise, expand_like
from stepdistill.schedules import FlowSchedule, TrigSchedule, VPSchedule

MODELS = {
    "unet2d": (lambda: tiny_unet2d(), (1, 8, 8)),
    "unet2d_class": (lambda: tiny_unet2d(num_classes=10), (1, 8, 8)),
    "sd": (tiny_unet2d_condition, (4, 8, 8)),
    "dit": (tiny_dit, (4, 8, 8)),
    "sd3": (tiny_sd3, (4, 8, 8)),
    "sana": (tiny_sana, (4, 8, 8)),
}


def vp():
    from diffusers import DDPMScheduler

    return VPSchedule.from_scheduler(DDPMScheduler())


SCHEDULES = {"epsilon": vp, "v_prediction": vp, "sample": vp, "flow": FlowSchedule}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
@pytest.mark.parametrize("schedule", [vp, FlowSchedule, TrigSchedule])
def test_conversion_round_trip(prediction_type, schedule):
    sched = schedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97])
    a, s = expand_like(sched.alpha(t), x0), expand_like(sched.sigma(t), x0)
    x_t = add_noise(sched, x0, noise, t)
    target = x0_to_prediction(x0, noise, a, s, prediction_type)
    assert torch.allclose(prediction_to_x0(target, x_t, a, s, prediction_type), x0, atol=1e-5)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_adapter_round_trip_through_model(family, prediction_type):
    """A hook swaps the model's output for the exact target: the adapter must return x0 to 1e-5,
    and must have passed the native timestep of the schedule."""
    make, shape = MODELS[family]
    model = make().eval()
    sched = SCHEDULES[prediction_type]()
    den = DiffusersDenoiser(model, sched, prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, *shape, generator=g), torch.randn(3, *shape, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = add_noise(sched, x0, noise, t)
    target = x0_to_prediction(x0, noise, expand_like(sched.alpha(t), x0), expand_like(sched.sigma(t), x0), prediction_type)
    seen = {}

    def hook(module, args, kwargs, output):
        ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen["timestep"] = torch.as_tensor(ts).float().reshape(-1)
        out_channels = output.sample.shape[1]
        pad = torch.zeros(3, out_channels - shape[0], *shape[1:])  # learned-sigma channels (DiT)
        return type(output)(sample=torch.cat([target, pad], 1))

    model.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        x0_hat = den(x_t, t, cond_for(family, 3, g))
    assert torch.allclose(x0_hat, x0, atol=1e-5)
    assert torch.allclose(seen["timestep"].expand(3), sched.to_native(t), atol=1e-4)


@pytest.mark.parametrize("family", list(MODELS))
def test_adapter_runs_real_forward(family):
    make, shape = MODELS[family]
    model = make().eval()
    den = DiffusersDenoiser(model, FlowSchedule() if family in ("sd3", "sana") else vp(), "flow" if family in ("sd3", "sana") else "epsilon")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = den(torch.randn(2, *shape, generator=g), torch.tensor([0.3, 0.6]), cond_for(family, 2, g))
    assert out.shape == (2, *shape) and torch.isfinite(out).all()
    assert den.family == family.replace("_class", "")


def test_adapter_errors_are_one_line():
    with pytest.raises(StepdistillError, match="unsupported prediction type 'score'"):
        DiffusersDenoiser(tiny_unet2d(), vp(), "score")
    with pytest.raises(StepdistillError, match="no adapter for Linear"):
        family_of(torch.nn.Linear(2, 2))
    den = DiffusersDenoiser(tiny_unet2d_condition(), vp(), "epsilon")
    with pytest.raises(StepdistillError, match="needs cond\\['prompt_embeds'\\]"):
        den(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), {})
