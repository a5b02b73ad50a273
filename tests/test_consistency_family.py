"""Consistency and adversarial objectives (lcm, scm, ladd, compose): formulas, tangents, TrigFlow, isolation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from stepdistill.adapters import wrap
from stepdistill.analytic import GaussianMixture, ring2d
from stepdistill.config import load_config
from stepdistill.consistency import boundary_coefficients, consistency_fn, ddim_step, tcd_sample, trig_sample, trig_times
from stepdistill.contract import StepdistillError, add_noise, as_time
from stepdistill.training.networks import MLPDenoiser
from stepdistill.objectives import Batch, Nets
from stepdistill.objectives.consistency.common import add_guidance_embedding, pseudo_huber
from stepdistill.objectives.compose import Compose
from stepdistill.objectives.consistency.lcm import LCM
from stepdistill.objectives.consistency.scm import SCM, scm_tangent
from stepdistill.schedules import FlowSchedule, TrigSchedule
from stepdistill.teachers import Teacher, _ddpm_schedule
from stepdistill.training.trainer import Trainer
from stepdistill.trigflow import TrigFlowView, native_time, trig_time

from conftest import tiny_dit, tiny_unet2d, tiny_unet2d_condition

VP = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}


def mlp_student(schedule, seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser((2,), schedule, hidden=16, depth=2)


# ------------------------------------------------------------------------- LCM boundary and target


def test_boundary_condition_and_lcm_coefficients():
    sched = _ddpm_schedule()
    c_skip, c_out = boundary_coefficients(sched, torch.tensor([0.0, 0.02, 1.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-4 and abs(c_out[2] - 1) < 1e-6  # LCM: the skip is a switch at t = 0 (scaling 10)
    x = torch.randn(5, 2)
    student = mlp_student(sched)
    assert torch.equal(consistency_fn(student, x, torch.zeros(5), None), x), "f(x, 0) must be x exactly"
    unet = wrap(tiny_unet2d(), VP, "epsilon")
    xi = torch.randn(2, 1, 8, 8)
    assert torch.equal(consistency_fn(unet, xi, torch.zeros(2), {}), xi)


@pytest.mark.parametrize("schedule", [_ddpm_schedule(), FlowSchedule()], ids=["vp", "flow"])
def test_lcm_loss_is_the_consistency_target(schedule):
    teacher = ring2d(schedule, classes=True)
    student = mlp_student(schedule)
    labels = torch.randint(0, 8, (16,), generator=torch.Generator().manual_seed(3))
    real = teacher.sample(16, torch.Generator().manual_seed(4), labels)
    batch = Batch(16, (2,), {"class_labels": labels}, {"class_labels": torch.full((16,), 8)}, real=real)
    obj = LCM(num_ddim_steps=10, guidance_scale_min=1.5, guidance_scale_max=3.0, huber_c=0.01)
    rng = torch.Generator().manual_seed(1)
    state = rng.get_state()
    loss = obj.loss("student", Nets(teacher=teacher, student=student), batch, rng).loss
    replay = torch.Generator().set_state(state)  # the same draws, the formula by hand
    n = torch.randint(1, 11, (16,), generator=replay)
    t, s = n / 10, (n - 1) / 10
    x_t = add_noise(schedule, real, batch.noise(replay), t)
    w = batch.uniform(replay, 1.5, 3.0)[:, None]
    x_c, x_u = teacher(x_t, t, batch.cond), teacher(x_t, t, batch.null_cond)
    x_s = ddim_step(schedule, x_t, x_u + w * (x_c - x_u), t, s)
    target = consistency_fn(student, x_s, s, batch.cond)
    assert torch.allclose(target[n == 1], x_s[n == 1]), "at s = 0 the target is the teacher's step itself"
    expected = pseudo_huber(consistency_fn(student, x_t, t, batch.cond), target, 0.01).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    with pytest.raises(StepdistillError, match="ema_decay"):
        LCM(target="ema").loss("student", Nets(teacher=teacher, student=student), batch, rng)


def test_guidance_embedding_matches_lcm_pipeline_and_reaches_the_student():
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    w = torch.tensor([1.0, 4.5, 8.0])
    cfg = {k: v for k, v in tiny_unet2d_condition().config.items() if not k.startswith("_")} | {"time_cond_proj_dim": 16}
    model = UNet2DConditionModel.from_config(cfg)
    den = wrap(model, VP, "epsilon")
    cond = add_guidance_embedding({"prompt_embeds": torch.randn(3, 5, 8)}, den, w, "auto")
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=16)
    assert torch.allclose(cond["timestep_cond"], ref, atol=2e-3)  # fp32 sin of arguments up to 7000 rad
    torch.nn.init.normal_(model.time_embedding.cond_proj.weight)
    x = torch.randn(3, 4, 8, 8)
    other = add_guidance_embedding(cond, den, w + 2, "auto")
    assert not torch.allclose(den(x, torch.full((3,), 0.5), cond), den(x, torch.full((3,), 0.5), other))
    plain = wrap(tiny_unet2d_condition(), VP, "epsilon")
    assert "timestep_cond" not in add_guidance_embedding({}, plain, w, "auto")
    with pytest.raises(StepdistillError, match="guidance input"):
        add_guidance_embedding({}, plain, w, "on")


def test_tcd_and_trig_samplers():
    sched = _ddpm_schedule()
    student = mlp_student(sched)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    one = tcd_sample(student, z, None, [1.0])
    assert torch.allclose(one, consistency_fn(student, z, torch.ones(64), None))
    det = [tcd_sample(student, z, None, [1.0, 0.6, 0.3], gamma=0.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(det[0], det[1]), "gamma = 0 is deterministic"
    sto = [tcd_sample(student, z, None, [1.0, 0.6, 0.3], gamma=0.5, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(sto[0], sto[1])
    view = TrigFlowView(student)
    assert torch.allclose(trig_sample(view, z, None, [1.2]), view.at_theta(z * 0.5, torch.full((64,), 1.2)))
    assert trig_times(2) == [math.pi / 2, 1.3] and len(trig_times(4)) == 4
    x = trig_sample(view, z, None, trig_times(3), torch.Generator().manual_seed(0))
    assert x.shape == z.shape and torch.isfinite(x).all()


# ------------------------------------------------------------------------------- TrigFlow and sCM


@pytest.mark.parametrize("schedule", [_ddpm_schedule(), FlowSchedule()], ids=["vp", "flow"])
@pytest.mark.parametrize("sigma_d", [0.5, 1.0])
def test_trigflow_conversion_reproduces_the_exact_denoiser(schedule, sigma_d):
    view, exact = TrigFlowView(ring2d(schedule), sigma_d), ring2d(TrigSchedule(sigma_d))
    g = torch.Generator().manual_seed(0)
    theta = view.theta_min + (view.theta_max - view.theta_min) * torch.rand(512, generator=g)
    x0 = exact.sample(512, g)
    x = theta.cos()[:, None] * x0 + theta.sin()[:, None] * sigma_d * torch.randn(512, 2, generator=g)
    err = (view.at_theta(x, theta) - exact(x, theta / (math.pi / 2))).abs().max()
    assert err < 1e-5, f"converted denoiser differs from the exact TrigFlow denoiser by {err:.2e}"
    assert (trig_time(schedule, native_time(schedule, theta, sigma_d), sigma_d) - theta).abs().max() < 1e-5


class ExactConsistency(torch.nn.Module):
    """The consistency function of N(mu, s^2 I) under a schedule: standardise, then rescale."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x, t, cond=None):
        t = as_time(t, x)
        a, sig = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        return self.mu + self.s * (x - a * self.mu) / (a**2 * self.s**2 + sig**2).sqrt()


@pytest.mark.parametrize("schedule", [TrigSchedule(0.5), FlowSchedule()], ids=["trig", "flow"])
@pytest.mark.parametrize("tangent", ["jvp", "finite_diff", "macro"])
def test_scm_tangent_vanishes_for_the_exact_consistency_function(schedule, tangent):
    mu, s = torch.tensor([[1.0, -0.5]]), 0.3
    teacher = GaussianMixture(mu, torch.tensor([s]), torch.ones(1), schedule)
    tv, sv = TrigFlowView(teacher), TrigFlowView(ExactConsistency(schedule, mu, s))
    g = torch.Generator().manual_seed(0)
    theta = 0.1 + 1.3 * torch.rand(64, generator=g)
    x = theta.cos()[:, None] * (mu + s * torch.randn(64, 2, generator=g)) + theta.sin()[:, None] * 0.5 * torch.randn(64, 2, generator=g)
    dxdt = (theta.cos()[:, None] * x - tv.at_theta(x, theta)) / theta.sin()[:, None]
    k = 0.01 if isinstance(schedule, TrigSchedule) else 2.0  # native units: radians in TrigFlow, 1/1000 of flow time
    obj = SCM(fd_native_steps=k) if tangent == "macro" else SCM(tangent=tangent, fd_step=1e-3)  # smooth map: larger h
    F_minus, J = obj.tangent_of(sv, x, theta, dxdt, None)
    g_full = scm_tangent(F_minus, J, x, dxdt, theta, 1.0, 0.5)
    g_first = scm_tangent(F_minus, torch.zeros_like(J), x, dxdt, theta, 1.0, 0.5)
    tol = {"jvp": 1e-4, "finite_diff": 2e-3, "macro": 2e-2}[tangent]
    assert g_full.abs().max() < tol * g_first.abs().max(), "df/dt along the ODE must vanish for the exact map"


@pytest.mark.parametrize("sched,pred", [(VP, "epsilon"), (FLOW, "flow")], ids=["vp", "flow"])
@pytest.mark.parametrize("family,factory", [("unet2d", lambda: tiny_unet2d(num_classes=10)), ("dit", tiny_dit)])
def test_jvp_tangent_matches_finite_differences_on_diffusers_models(family, factory, sched, pred):
    """Tolerance: relative L2 error 3e-3 against fp32 central differences with h = 1e-4 (measured 7e-4 to 1.5e-3).

    The models' sinusoidal time embedding sees 1000 t, so F curves fast in t: FD truncation error
    is ~1% at h = 1e-3 and ~100% at h = 1e-2; the fp32 JVP agrees with an fp64 JVP to 1e-6."""
    torch.manual_seed(0)
    den = wrap(factory().eval().requires_grad_(False), sched, pred)
    view = TrigFlowView(den)
    g = torch.Generator().manual_seed(1)
    c = den.model.config.in_channels
    x = torch.randn(3, c, 8, 8, generator=g) * 0.5
    theta = torch.tensor([0.3, 0.8, 1.3])
    dxdt = torch.randn(x.shape, generator=g)
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    F_j, J_j = SCM(tangent="jvp").tangent_of(view, x, theta, dxdt, cond)
    obj = SCM(tangent="finite_diff", fd_step=1e-4)
    F_f, J_f = obj.tangent_of(view, x, theta, dxdt, cond)
    assert not obj._jvp_failed
    rel = ((J_j - J_f).norm() / J_f.norm()).item()
    assert torch.allclose(F_j, F_f, atol=1e-5) and rel < 3e-3, f"JVP vs FD relative error {rel:.2e}"


@pytest.mark.parametrize("sched,pred", [(VP, "epsilon"), (FLOW, "flow")], ids=["vp", "flow"])
def test_macro_tangent_steps_a_fixed_number_of_native_steps_and_smooths_the_time_embedding(sched, pred):
    """fd_native_steps=k: the central difference evaluates the network k native teacher steps either side of
    every sample's time (whatever theta), and on a diffusers UNet it differs from the exact JVP, which
    follows the sinusoidal embedding's sub-step structure, while agreeing with the exact one at a tiny k."""
    torch.manual_seed(0)
    den = wrap(tiny_unet2d(num_classes=10).eval().requires_grad_(False), sched, pred)
    view = TrigFlowView(den)
    theta = torch.tensor([0.3, 0.8, 1.3, 1.5])
    obj = SCM(fd_native_steps=10.0)
    t = view.solve(theta)[0]
    h = obj.macro_step(view, theta, t)
    cs = theta.cos() * theta.sin()
    steps = lambda th: den.schedule.to_native(native_time(den.schedule, th)).double()  # noqa: E731
    up, down = steps(theta + h * cs) - steps(theta), steps(theta) - steps(theta - h * cs)  # symmetric in theta, so
    assert ((up - 10).abs() < 0.5).all() and ((down - 10).abs() < 0.5).all(), (up, down)  # ~10 steps each side
    assert ((up + down - 20).abs() < 0.5).all(), (up + down)
    g = torch.Generator().manual_seed(1)
    c = den.model.config.in_channels
    x, dxdt = torch.randn(4, c, 8, 8, generator=g) * 0.5, torch.randn(4, c, 8, 8, generator=g)
    cond = {"class_labels": torch.tensor([1, 2, 3, 4])}
    F_m, J_m = obj.tangent_of(view, x, theta, dxdt, cond)
    F_j, J_j = SCM(tangent="jvp").tangent_of(view, x, theta, dxdt, cond)
    _, J_tiny = SCM(fd_native_steps=0.01).tangent_of(view, x, theta, dxdt, cond)
    assert torch.allclose(F_m, F_j, atol=1e-5) and torch.isfinite(J_m).all()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(J_tiny, J_j) < 2e-2, "a macro step of 0.01 native steps is the exact derivative again"
    assert rel(J_m, J_j) > 0.1, "10 native steps must not see the sub-step structure the JVP follows"


def test_scm_max_time_branch_trains_that_share_at_the_one_step_time():
    sched = _ddpm_schedule()
    view = TrigFlowView(mlp_student(sched))
    batch = Batch(size=4000, sample_shape=(2,), cond={})
    plain = SCM(t_max=0.95).sample_theta(batch, torch.Generator().manual_seed(0), view)
    hi = float(trig_time(sched, torch.tensor([0.95]))) - 1e-3
    branch = SCM(t_max=0.95, max_time_prob=0.5).sample_theta(batch, torch.Generator().manual_seed(0), view)
    at_top, plain_top = (branch - hi).abs() < 1e-6, (plain - hi).abs() < 1e-6  # plain: clamped there only
    assert plain_top.float().mean() < 0.02 and 0.45 < at_top.float().mean() < 0.55, (plain_top.float().mean(), at_top.float().mean())
    assert torch.equal(branch[~at_top], plain[~at_top]), "the branch replaces samples, it does not move the others"
    with pytest.raises(StepdistillError, match="max_time_prob"):
        load_config("digits-unet/scm", ["objective.max_time_prob=1.5"])


class NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g


def test_scm_falls_back_to_finite_differences_with_a_warning():
    sched = _ddpm_schedule()
    inner = mlp_student(sched)

    class Blocked(torch.nn.Module):
        schedule = sched

        def forward(self, x, t, cond=None):
            return NoForwardAD.apply(inner(x, t, cond))

    view = TrigFlowView(Blocked())
    obj = SCM()
    x, theta = torch.randn(4, 2), torch.full((4,), 0.7)
    with pytest.warns(UserWarning, match="finite differences"):
        _, J = obj.tangent_of(view, x, theta, torch.ones(4, 2), None)
    assert obj._jvp_failed and torch.isfinite(J).all()
    _, J_ref = SCM(tangent="finite_diff").tangent_of(TrigFlowView(inner), x, theta, torch.ones(4, 2), None)
    assert torch.allclose(J, J_ref)


# (every objective x every family: tests/test_contract_matrix.py, over the registries)
from test_contract_matrix import OBJECTIVES  # noqa: E402


# ------------------------------------------------------------------------------------- composition


def test_compose_unions_phases_and_applies_weights():
    sched = _ddpm_schedule()
    teacher, student = ring2d(sched), mlp_student(sched)
    obj = Compose(parts=[{"name": "lcm", "weight": 0.3, "num_ddim_steps": 5}, {"name": "scm", "weight": 2.0}])
    assert obj.trains == ("student", "scm_logvar") and obj.phases == {"student": 1}
    assert obj.phase_updates("student") == ("student", "scm_logvar")
    info = Teacher("ring", teacher, lambda n, g: ({}, None), (2,))
    extra = obj.extra_networks(info)
    assert set(extra) == {"scm_logvar"}
    real = teacher.sample(8, torch.Generator().manual_seed(0))
    batch = Batch(8, (2,), {}, None, real=real)
    nets = Nets(teacher=teacher, student=student, extra=extra)
    rng = torch.Generator().manual_seed(5)
    state = rng.get_state()
    out = obj.loss("student", nets, batch, rng)
    replay = torch.Generator().set_state(state)
    extra["scm_logvar"].calls.zero_()  # the warm-up counter advanced once; replay from the same count
    lcm = obj._parts[0].objective.loss("student", nets, batch, replay).loss
    scm = obj._parts[1].objective.loss("student", Nets(teacher=teacher, student=student, extra={"logvar": extra["scm_logvar"]}),
                                       batch, replay).loss
    assert torch.allclose(out.loss, 0.3 * lcm + 2.0 * scm, rtol=1e-5)
    assert out.logs["lcm/loss"] == pytest.approx(lcm.item(), rel=1e-5) and "scm/scm_warmup_r" in out.logs
    mixed = Compose(parts=[{"name": "scm"}, {"name": "ladd", "disc_ratio": 3}])
    assert mixed.phases == {"student": 1, "discriminator": 3} and mixed.phase_updates("discriminator") == ("ladd_discriminator",)
    with pytest.raises(StepdistillError, match="objective.parts\\[1\\].disc_rtio.*did you mean 'disc_ratio'"):
        load_config(None, ["objective.name=compose", "objective.parts=[{name: scm}, {name: ladd, disc_rtio: 2}]"])
    with pytest.raises(StepdistillError, match="parts is empty"):
        Compose()


def test_compose_phase_counts_must_agree():
    with pytest.raises(StepdistillError, match="make the counts equal"):
        Compose(parts=[{"name": "ladd", "disc_ratio": 2}, {"name": "ladd", "disc_ratio": 3}])


# ---------------------------------------------------------------------- trainer: isolation, resume

FAST = ["train.log_every=1", "train.sample_every=0", "train.batch_size=4", "train.num_sample_images=4", "train.steps=1"]


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.mark.parametrize("objective,init", [("lcm", "lora"), ("scm", "copy"), ("ladd", "copy"), ("compose", "lora")])
def test_gradient_isolation_per_phase(tmp_path, unet_teacher_dir, objective, init):
    import yaml

    spec = copy.deepcopy(OBJECTIVES[objective])
    over = [f"teacher.name={unet_teacher_dir}", f"student.init={init}", "student.lora_rank=2", "student.times=[0.95]",
            f"objective={yaml.safe_dump(spec, default_flow_style=True).strip()}"]
    tr = Trainer(load_config(None, FAST + over), tmp_path / objective, progress=False)
    teacher_params = [p for n, p in tr.teacher.denoiser.named_parameters() if "lora_" not in n]
    t0 = snapshot(teacher_params)
    for phase in tr.objective.phases:
        updated = tr.objective.phase_updates(phase)
        before = {n: snapshot(t.params) for n, t in tr.trainables.items()}
        tr.update(phase)
        for name, trainable in tr.trainables.items():
            moved = changed(before[name], trainable.params)
            assert moved == (name in updated), f"{objective}/{phase}: {name} {'moved' if moved else 'did not move'}"
    assert not changed(t0, teacher_params) and all(not p.requires_grad for p in teacher_params)


def test_lcm_ema_target_and_scm_warmup_resume_exactly(tmp_path):
    over = ["train.log_every=1", "train.sample_every=0", "train.batch_size=32", "train.num_sample_images=4",
            "student.fit_steps=20", "student.mlp_hidden=16", "train.steps=4", "train.checkpoint_every=2"]
    for recipe, extra in (("toy2d/lcm", ["objective.target=ema", "student.ema_decay=0.95"]), ("toy2d/scm", [])):
        cfg = load_config(recipe, over + extra)
        name = recipe.split("/")[1]
        Trainer(cfg, tmp_path / f"{name}-a", progress=False).run()
        Trainer(cfg, tmp_path / f"{name}-b", progress=False).run(until=2)
        resumed = Trainer(cfg, tmp_path / f"{name}-b", resume=True, progress=False)
        resumed.run()
        full = Trainer(cfg, tmp_path / f"{name}-a", resume=True, progress=False)
        for net in full.trainables:
            assert all(torch.equal(p, q) for p, q in zip(full.trainables[net].params, resumed.trainables[net].params)), (name, net)
        if full.ema is not None:
            assert all(torch.equal(p, q) for p, q in zip(full.ema.shadow_params, resumed.ema.shadow_params))
        if "logvar" in full.trainables:
            assert int(full.trainables["logvar"].module.calls) == int(resumed.trainables["logvar"].module.calls) == 4


# -------------------------------------------------------------------------------------------- recipes

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"
OURS = ["lcm", "scm", "ladd", "scm-ladd", "lcm-ladd"]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(RECIPES)) for t in ("digits-unet", "digits-sd", "digits-flow", "toy2d")
                                        for p in (RECIPES / t).glob("*.yaml") if p.stem in OURS), )
def test_recipes_parse(path):
    cfg = load_config(str(RECIPES / path))
    assert cfg.objective.registry_name in ("lcm", "scm", "ladd", "compose")


def test_every_teacher_has_our_recipes():
    for teacher in ("digits-unet", "digits-sd", "digits-flow"):
        assert {p.stem for p in (RECIPES / teacher).glob("*.yaml")} >= set(OURS), teacher
