import math

import pytest
import torch
from diffusers import DDPMScheduler

from stepdistill.contract import StepdistillError, add_noise
from stepdistill.schedules import FlowSchedule, TrigSchedule, VPSchedule, loss_weight, schedule_from_scheduler_config


def sd_schedule():
    return VPSchedule.from_scheduler(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))


@pytest.mark.parametrize("step, alpha_bar", [(999, 0.00466), (980, 0.0058), (625, 0.138), (399, 0.426), (20, 0.981)])
def test_vp_matches_published_sd_alpha_bar(step, alpha_bar):
    # values pinned in shared/reference/objectives.md section 0.1
    vp = sd_schedule()
    t = vp.from_native(torch.tensor([float(step)]))
    assert vp.alpha_bar(t).item() == pytest.approx(alpha_bar, rel=0.02)


def test_vp_native_round_trip_and_fractional_steps():
    vp = sd_schedule()
    steps = torch.tensor([0.0, 1.5, 249.0, 749.25, 999.0])
    assert torch.allclose(vp.to_native(vp.from_native(steps)), steps)
    ab = vp.alpha_bar(torch.linspace(0, 1, 500))
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must decrease monotonically in t"
    mid = vp.alpha_bar(vp.from_native(torch.tensor([10.5])))
    lo, hi = vp.alpha_bar(vp.from_native(torch.tensor([10.0, 11.0])))
    assert hi < mid < lo
    assert torch.allclose(vp.alpha(steps / 999) ** 2 + vp.sigma(steps / 999) ** 2, torch.ones(5), atol=1e-6)


def test_flow_and_trig_schedules():
    t = torch.tensor([0.0, 0.25, 1.0])
    flow = FlowSchedule()
    assert torch.allclose(flow.alpha(t) + flow.sigma(t), torch.ones(3))
    assert torch.allclose(flow.to_native(t), t * 1000)
    trig = TrigSchedule(sigma_d=0.5)
    assert trig.to_native(torch.tensor(1.0)).item() == pytest.approx(math.pi / 2)
    assert torch.allclose(trig.alpha(t) ** 2 + (trig.sigma(t) / 0.5) ** 2, torch.ones(3), atol=1e-6)


def test_schedule_from_config_picks_family():
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert schedule_from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler().config, _class_name="FlowMatchEulerDiscreteScheduler")).kind == "flow"
    assert schedule_from_scheduler_config(dict(DDPMScheduler().config, _class_name="DDPMScheduler")).kind == "vp"


def test_loss_weight_eps_equals_eps_mse():
    vp = sd_schedule()
    t = torch.tensor([0.3, 0.7])
    x0, noise, delta = torch.randn(2, 4), torch.randn(2, 4), 0.01 * torch.randn(2, 4)
    x_t = add_noise(vp, x0, noise, t)
    eps_hat = (x_t - vp.alpha(t)[:, None] * (x0 + delta)) / vp.sigma(t)[:, None]
    eps_mse = ((eps_hat - noise) ** 2).mean(1)
    assert torch.allclose(loss_weight(vp, t, "eps") * (delta**2).mean(1), eps_mse, rtol=1e-3)
    with pytest.raises(StepdistillError, match="unknown loss weighting"):
        loss_weight(vp, t, "snr")


def test_vp_rejects_bad_table():
    with pytest.raises(StepdistillError):
        VPSchedule(torch.tensor([1.5, 0.5]))


def test_ddim_sample_clips_x0_as_the_teachers_scheduler():
    """Issue 17 item 6: on digits-unet (cosine betas, clip_sample) the first x0_hat at t = 1 is
    divided by alpha(1) ~ 5e-5; unclipped, 50-step DDIM samples blew up (max |x| in the thousands)."""
    from stepdistill.sampling import ddim_sample
    from stepdistill.teachers import load_teacher

    teacher = load_teacher("digits-unet")
    assert teacher.denoiser.schedule.x0_clip == 1.0
    g = torch.Generator().manual_seed(0)
    cond, null = teacher.conditioner(8, g)
    x = ddim_sample(teacher.denoiser, torch.randn(8, *teacher.sample_shape, generator=g), cond, 50, null, 2.0)
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0 + 1e-6


def test_student_sigmas_map_onto_each_teachers_schedule():
    """student.sigmas (EDM sigma/alpha) give the same noise level on any schedule: a recipe transfers."""
    from stepdistill.schedules import FlowSchedule, VPSchedule
    from stepdistill.training.run import times_of_sigmas
    from diffusers import DDPMScheduler

    cosine = VPSchedule.from_config(dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config))
    (t,) = times_of_sigmas(cosine, [2.5], log=lambda _m: None)
    assert round(t * 999) == 755  # the digits-unet SiD recipe's step
    tt = torch.tensor([t])
    assert abs(float(cosine.sigma(tt) / cosine.alpha(tt)) - 2.5) < 0.01
    sd = VPSchedule.from_config(dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config))
    assert round(times_of_sigmas(sd, [2.5], log=lambda _m: None)[0] * 999) == 625  # SiD-LSG's t_init on SD
    flow = times_of_sigmas(FlowSchedule(), [2.5, 1.0], log=lambda _m: None)
    assert flow == pytest.approx([2.5 / 3.5, 0.5], abs=1e-6)
    said = []
    assert times_of_sigmas(sd, [1e6], log=said.append) == [1.0] and "start from t = 1" in said[0]


def test_student_times_on_the_command_line_replace_a_recipes_sigmas():
    """A recipe that gives student.sigmas (digits-unet/sid) still takes student.times=...: the times win."""
    from stepdistill.config import load_config

    assert load_config("digits-unet/sid").student.sigmas == [2.5]
    cfg = load_config("digits-unet/sid", ["student.times=[1.0, 0.5]"])
    assert cfg.student.sigmas == [] and cfg.student.times == [1.0, 0.5]
    both = load_config("digits-unet/sid", ["student.times=[1.0]", "student.sigmas=[4.0]"])
    assert both.student.sigmas == [4.0]  # both given: sigmas win, as in the recipe


def test_student_sigmas_are_checked():
    from stepdistill.config import load_config
    from stepdistill.contract import StepdistillError

    for bad in ("[1.0, 2.0]", "[0]", "[-1]", "[.nan]"):
        with pytest.raises(StepdistillError, match="sigmas"):
            load_config("toy2d/dmd", [f"student.sigmas={bad}"])
