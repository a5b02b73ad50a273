"""Score-distillation family (dmd2, vsd, sid): generator gradients against their formulas on the
analytic teacher, per-phase gradient isolation, every adapter family, backward simulation, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stepdistill.adapters import wrap
from stepdistill.analytic import ring2d
from stepdistill.config import build_objective_config, load_config
from stepdistill.contract import StepdistillError, add_noise
from stepdistill.objectives import Batch, Nets, registered
from stepdistill.objectives.score.dmd2 import DMD2
from stepdistill.objectives.score.common import drop_to_null
from stepdistill.objectives.score.sid import SiD
from stepdistill.objectives.score.vsd import VSD
from stepdistill.teachers import Teacher, _ddpm_schedule
from stepdistill.training.trainer import Trainer

from conftest import tiny_dit, tiny_unet2d


class FixedSamples(nn.Module):
    """A 'student' whose output is a learnable tensor, whatever its input."""

    def __init__(self, x, schedule):
        super().__init__()
        self.x, self.schedule = nn.Parameter(x.clone()), schedule

    def forward(self, x_t, t, cond=None):
        return self.x


def ring_setup(n=16, seed=0):
    """Exact teacher (8-mode ring, class per mode), a different exact 'fake score' (wider ring)."""
    sched = _ddpm_schedule()
    teacher = ring2d(sched, classes=True)
    fake = ring2d(sched, radius=1.5, std=0.2, classes=True)
    g = torch.Generator().manual_seed(seed)
    student = FixedSamples(torch.randn(n, 2, generator=g) * 2, sched)
    labels = torch.randint(0, 8, (n,), generator=g)
    batch = Batch(n, (2,), {"class_labels": labels}, {"class_labels": torch.full((n,), 8)})
    return sched, teacher, fake, student, batch


def cfg(den, x_t, t, batch, w):
    """CFG by hand: x_u + w (x_c - x_u); w [B] or a number."""
    x_c, x_u = den(x_t, t, batch.cond), den(x_t, t, batch.null_cond)
    w = torch.as_tensor(w, dtype=torch.float32)
    return x_u + (w[:, None] if w.ndim else w) * (x_c - x_u)


def student_grad(obj, nets, batch, student, seed=1):
    rng = torch.Generator().manual_seed(seed)
    state = rng.get_state()
    out = obj.loss("student", nets, batch, rng)
    (grad,) = torch.autograd.grad(out.loss, student.x)
    return grad, out, torch.Generator().set_state(state)


# ----------------------------------------------------------------- (a) generator gradient formulas


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_dmd2_generator_gradient_is_the_dmd_direction(guidance_scale):
    sched, teacher, fake, student, batch = ring_setup()
    obj = DMD2(guidance_scale=guidance_scale)
    grad, out, replay = student_grad(obj, Nets(teacher=teacher, student=student, fake_score=fake), batch, student)
    batch.noise(replay)  # the student's input noise (one step: no step-index draw)
    t = batch.uniform(replay, obj.t_min, obj.t_max)
    x = student.x.detach()
    x_t = add_noise(sched, x, batch.noise(replay), t)
    x_real = cfg(teacher, x_t, t, batch, guidance_scale)
    w = 1 / ((x - x_real).abs().mean(1, keepdim=True) + obj.normaliser_eps)
    expected = (fake(x_t, t, batch.cond) - x_real) * w / x.numel()  # DMD2 Eq. 2-3 through the surrogate
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert out.logs["step_k"] == 0 and "gan_g_loss" not in out.logs


def test_dmd2_decoupled_cfg_split_gradient():
    sched, teacher, fake, student, batch = ring_setup()
    obj = DMD2(guidance_scale=3.0, cfg_split=True, ca_weight=0.5, ca_t_min=0.3, ca_t_max=0.9)
    grad, out, replay = student_grad(obj, Nets(teacher=teacher, student=student, fake_score=fake), batch, student)
    batch.noise(replay)
    x = student.x.detach()
    t = batch.uniform(replay, obj.t_min, obj.t_max)
    x_t = add_noise(sched, x, batch.noise(replay), t)
    real_c = teacher(x_t, t, batch.cond)
    g_dm = (fake(x_t, t, batch.cond) - real_c) / ((x - real_c).abs().mean(1, keepdim=True) + obj.normaliser_eps)
    tau = batch.uniform(replay, 0.3, 0.9)
    x_tau = add_noise(sched, x, batch.noise(replay), tau)
    tc, tu = teacher(x_tau, tau, batch.cond), teacher(x_tau, tau, batch.null_cond)
    g_ca = -(3.0 - 1) * (tc - tu) / ((x - tc).abs().mean(1, keepdim=True) + obj.normaliser_eps)
    assert torch.allclose(grad, (g_dm + 0.5 * g_ca) / x.numel(), rtol=1e-4, atol=1e-7)
    assert out.logs["ca_grad_norm"] > 0
    # the GAN share is taken against all of the distillation gradient (DM + CA), not the DM part alone
    total = (g_dm + 0.5 * g_ca).reshape(len(x), -1).norm(dim=1).mean().item()
    assert out.logs["distill_grad_norm"] == pytest.approx(total, rel=1e-4)
    with pytest.raises(StepdistillError, match="cfg_split"):
        DMD2(cfg_split=True).loss("student", Nets(teacher=teacher, student=student, fake_score=fake), batch, torch.Generator())


@pytest.mark.parametrize("scale,scale_max", [(1.0, 0.0), (4.5, 0.0), (2.0, 6.0)], ids=["no-cfg", "cfg", "snoopi"])
def test_vsd_generator_gradient_matches_swiftbrush(scale, scale_max):
    sched, teacher, fake, student, batch = ring_setup()
    obj = VSD(guidance_scale=scale, guidance_scale_max=scale_max)
    grad, out, replay = student_grad(obj, Nets(teacher=teacher, student=student, fake_score=fake), batch, student)
    batch.noise(replay)
    t = batch.uniform(replay, obj.t_min, obj.t_max)
    x = student.x.detach()
    x_t = add_noise(sched, x, batch.noise(replay), t)
    w = batch.uniform(replay, scale, scale_max) if scale_max else torch.full((16,), scale)
    if scale_max:
        assert w.std() > 0.5, "SNOOPI: one scale per sample"
    # SwiftBrush: g = sigma^2 (eps_T - eps_L), CFG with the same w on both; eps = (x_t - alpha x0) / sigma
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    eps_teacher = (x_t - a * cfg(teacher, x_t, t, batch, w)) / s
    eps_fake = (x_t - a * cfg(fake, x_t, t, batch, w)) / s
    expected = s**2 * (eps_teacher - eps_fake) / x.numel()
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert out.logs["guidance_scale"] == pytest.approx(w.mean().item(), rel=1e-5)


def test_vsd_fake_loss_trains_the_null_branch():
    sched, teacher, fake, student, batch = ring_setup(n=64)
    nets = Nets(teacher=teacher, student=student, fake_score=fake)
    for p in (0.0, 0.5, 1.0):
        obj = VSD(p_uncond=p, critic_weighting="swiftbrush")
        rng = torch.Generator().manual_seed(3)
        state = rng.get_state()
        loss = obj.loss("fake_score", nets, batch, rng).loss
        replay = torch.Generator().set_state(state)
        batch.noise(replay)
        t = batch.uniform(replay, 0.0, 1.0)
        x = student.x.detach()
        x_t = add_noise(sched, x, batch.noise(replay), t)
        drop = torch.rand(64, generator=replay) < p if p > 0 else torch.zeros(64, dtype=torch.bool)
        labels = torch.where(drop, batch.null_cond["class_labels"], batch.cond["class_labels"])
        assert (0 < drop.float().mean() < 1) if p == 0.5 else bool(drop.all() == (p == 1.0))
        a, s = sched.alpha(t), sched.sigma(t)
        lam = (a**2 * (a / s) ** 2).clamp(max=1e4 * a**2)  # |sqrt(abar)(eps_hat - eps)|^2 in x0 terms
        expected = (lam * ((fake(x_t, t, {"class_labels": labels}) - x) ** 2).mean(1)).mean()
        assert torch.allclose(loss, expected, rtol=1e-5), p


SID_GUIDANCE = [(1.0, 1.0), (2.5, 2.5), (1.0, 0.0), (1.0, -1.0)]


@pytest.mark.parametrize("kappa_real,kappa_fake", SID_GUIDANCE, ids=["none", "cfg", "zero-cfg", "anti-cfg"])
def test_sid_generator_gradient_backpropagates_through_both_scores(kappa_real, kappa_fake):
    sched, teacher, fake, student, batch = ring_setup()
    obj = SiD(alpha=1.2, guidance_scale=kappa_real, fake_guidance_scale=kappa_fake)
    grad, out, replay = student_grad(obj, Nets(teacher=teacher, student=student, fake_score=fake), batch, student)
    batch.noise(replay)
    t = batch.uniform(replay, obj.t_min, obj.t_max)
    eps = batch.noise(replay)

    def sid_loss(x, through_scores=True):
        x_t = add_noise(sched, x, eps, t)
        x_in = x_t if through_scores else x_t.detach()
        x_r = cfg(teacher, x_in, t, batch, kappa_real) if kappa_real != 1 else teacher(x_in, t, batch.cond)
        x_f = cfg(fake, x_in, t, batch, kappa_fake)
        w = 1 / (x.detach() - x_r.detach()).abs().mean(1, keepdim=True).clamp_min(1e-5)
        return (w * (x_r - x_f) * ((x_r - x) - 1.2 * (x_r - x_f))).mean()  # SiD Eq. 23, mean reduction

    x = student.x.detach().clone().requires_grad_(True)
    loss = sid_loss(x)
    (expected,) = torch.autograd.grad(loss, x)
    assert torch.allclose(out.loss, loss, rtol=1e-5)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-8)
    (no_jac,) = torch.autograd.grad(sid_loss(x, through_scores=False), x)
    assert (grad - no_jac).abs().max() > 1e-3 * grad.abs().max(), "the teacher/fake Jacobian terms must be in the gradient"


def test_sid_sum_reduction_and_one_minus_sigma_weighting():
    sched, teacher, fake, student, batch = ring_setup()
    nets = Nets(teacher=teacher, student=student, fake_score=fake)
    base = SiD(weighting="none").loss("student", nets, batch, torch.Generator().manual_seed(1)).loss
    summed = SiD(weighting="none", reduction="sum", loss_scale=100).loss("student", nets, batch, torch.Generator().manual_seed(1)).loss
    assert torch.allclose(summed, base * 2 * 100, rtol=1e-5)  # sum over D = 2 elements, mean over batch, x100
    with pytest.raises(StepdistillError, match="objective.weighting"):
        SiD(weighting="snr")


VANISH = {"dmd2": {"fake_guidance_scale": 2.0}, "vsd": {}, "sid": {"fake_guidance_scale": 2.0, "alpha": 1.0}}


@pytest.mark.parametrize("name", list(VANISH))
def test_generator_gradient_vanishes_when_the_fake_score_is_the_teacher(name):
    """Same scores, same guidance on both: the divergence and its gradient are zero."""
    sched, teacher, _, student, batch = ring_setup()
    obj = build_objective_config({"name": name, "guidance_scale": 2.0} | VANISH[name])
    grad, _, _ = student_grad(obj, Nets(teacher=teacher, student=student, fake_score=teacher), batch, student)
    assert grad.abs().max() < 1e-7


# ------------------------------------------------------------------------------------- GAN head


def test_dmd2_gan_needs_real_data_and_a_head():
    sched, teacher, fake, student, batch = ring_setup()
    assert DMD2().trains == ("student", "fake_score") and DMD2().extra_networks(None) == {}
    obj = DMD2(gan_weight=0.01)
    assert obj.trains == ("student", "fake_score", "gan_head") and obj.phase_updates("fake_score") == ("fake_score", "gan_head")
    info = Teacher("ring", teacher, lambda n, g: ({}, None), (2,), sample_data=lambda n, g, c=None: teacher.sample(n, g))
    head = obj.extra_networks(info)["gan_head"]
    from stepdistill.training.networks import MLPDenoiser

    mlp = MLPDenoiser((2,), sched, hidden=24, depth=2, num_classes=8)
    nets = Nets(teacher=teacher, student=student, fake_score=mlp, extra={"gan_head": head})
    with pytest.raises(StepdistillError, match="needs real data: set data.real"):
        obj.loss("fake_score", nets, batch, torch.Generator())
    batch.real, batch.real_labels = teacher.sample(16, torch.Generator().manual_seed(0)), batch.cond["class_labels"]
    out = obj.loss("fake_score", nets, batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is not None for p in head.parameters()) and out.logs["gan_d_loss"] > 0
    assert mlp.body[0].weight.grad is not None, "the classifier loss also trains the fake score's encoder"
    head.zero_grad(), mlp.zero_grad()
    x = student.x
    out = obj.loss("student", Nets(teacher=teacher, student=student, fake_score=mlp.requires_grad_(False),
                                   extra={"gan_head": head.requires_grad_(False)}), batch, torch.Generator().manual_seed(0))
    (gx,) = torch.autograd.grad(out.loss, x)
    dm_only = DMD2().loss("student", Nets(teacher=teacher, student=student, fake_score=mlp), batch, torch.Generator().manual_seed(0))
    (gdm,) = torch.autograd.grad(dm_only.loss, x)
    assert out.logs["gan_g_loss"] > 0 and not torch.allclose(gx, gdm), "the GAN G term must reach the student sample"
    # the logged norms are those of each term's gradient at x; the cap scales the GAN part alone
    norm = lambda g: g.reshape(len(g), -1).norm(dim=1).mean().item()  # noqa: E731
    assert abs(norm(gx - gdm) - out.logs["gan_grad_norm"]) < 1e-6 * max(1.0, norm(gx - gdm))
    assert abs(norm(gdm) - out.logs["dm_x_grad_norm"]) < 1e-4 * norm(gdm)
    assert out.logs["gan_share"] == pytest.approx(norm(gx - gdm) / norm(gdm), rel=1e-3)
    nets_g = Nets(teacher=teacher, student=student, fake_score=mlp, extra={"gan_head": head})
    strong = DMD2(gan_weight=30.0).loss("student", nets_g, batch, torch.Generator().manual_seed(0))  # a share near 0.1-1
    (gs,) = torch.autograd.grad(strong.loss, x)
    capped_obj = DMD2(gan_weight=30.0, gan_max_share=strong.logs["gan_share"] / 2)
    capped = capped_obj.loss("student", nets_g, batch, torch.Generator().manual_seed(0))
    (gc,) = torch.autograd.grad(capped.loss, x)
    assert torch.allclose(gc - gdm, (gs - gdm) / 2, rtol=1e-3, atol=1e-6 * norm(gs - gdm)), "capped to half: the GAN part halves"
    assert capped.logs["gan_share"] == pytest.approx(strong.logs["gan_share"]), "the log keeps the uncapped share"


def test_drop_to_null_handles_nested_conditions():
    cond = {"prompt_embeds": torch.ones(6, 3, 2), "added": {"text_embeds": torch.ones(6, 4)}, "flag": True}
    null = {"prompt_embeds": torch.zeros(6, 3, 2), "added": {"text_embeds": torch.zeros(6, 4)}, "flag": True}
    out = drop_to_null(cond, null, 0.5, 6, torch.Generator().manual_seed(0))
    dropped = out["prompt_embeds"][:, 0, 0] == 0
    assert 0 < dropped.sum() < 6 and torch.equal(dropped, out["added"]["text_embeds"][:, 0] == 0) and out["flag"] is True
    assert drop_to_null(cond, None, 0.5, 6, torch.Generator()) == cond


# ------------------------------------------------------------------ (d) backward simulation: step k


class PerStep(nn.Module):
    """A denoiser with one parameter row per generation time: shows which step got gradient."""

    def __init__(self, times, schedule):
        super().__init__()
        self.times, self.schedule = list(times), schedule
        self.p = nn.Parameter(torch.zeros(len(times), 2))

    def forward(self, x_t, t, cond=None):
        idx = [min(range(len(self.times)), key=lambda i: abs(self.times[i] - v)) for v in t.tolist()]
        return 0.3 * x_t + self.p[idx]


@pytest.mark.parametrize("name", ["dmd2", "sid", "vsd"])
def test_backward_simulation_trains_only_the_chosen_step(name):
    sched, teacher, fake, _, batch = ring_setup()
    times = (1.0, 0.75, 0.5, 0.25)
    student = PerStep(times, sched)
    nets = Nets(teacher=teacher, student=student, student_times=times, fake_score=fake)
    obj = registered()[name]()
    seen = set()
    rng = torch.Generator().manual_seed(0)
    for _ in range(24):
        out = obj.loss("student", nets, batch, rng)
        (g,) = torch.autograd.grad(out.loss, student.p)
        k = int(out.logs["step_k"])
        seen.add(k)
        rows = g.abs().sum(1)
        assert rows[k] > 0 and all(rows[i] == 0 for i in range(4) if i != k), (k, rows.tolist())
    assert seen == {0, 1, 2, 3}, "every step, the pure-noise one included, gets its share"


# (every objective x every family: tests/test_contract_matrix.py, over the registries)
from test_contract_matrix import OBJECTIVES, VP  # noqa: E402


# ------------------------------------------------------------- (b) trainer: per-phase isolation

FAST = ["train.log_every=1", "train.sample_every=0", "train.batch_size=4", "train.num_sample_images=4", "train.steps=1"]


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.fixture
def real_folder(tmp_path):
    from PIL import Image
    import numpy as np

    folder = tmp_path / "real"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(g.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("init", ["copy", "lora"])
@pytest.mark.parametrize("objective", ["dmd2-gan", "vsd", "sid"])
def test_gradient_isolation_per_phase(tmp_path, unet_teacher_dir, real_folder, objective, init):
    import yaml

    spec = dict(OBJECTIVES[objective], critic_ratio=1)
    over = [f"teacher.name={unet_teacher_dir}", f"student.init={init}", f"fake_score.init={init}", "student.lora_rank=2",
            "fake_score.lora_rank=2", "student.times=[0.95, 0.5]", f"data.real={real_folder}",
            f"objective={yaml.safe_dump(spec, default_flow_style=True).strip()}"]
    tr = Trainer(load_config(None, FAST + over), tmp_path / objective, progress=False)
    assert set(tr.trainables) == set(tr.objective.trains)
    teacher_params = [p for n, p in tr.teacher.denoiser.named_parameters() if "lora_" not in n]
    t0 = _snapshot(teacher_params)
    ever_moved = set()
    for phase in tr.objective.phases:
        updated = tr.objective.phase_updates(phase)
        before = {n: _snapshot(t.params) for n, t in tr.trainables.items()}
        logs = tr.update(phase)
        assert f"{phase}/nonfinite" not in logs
        for name, trainable in tr.trainables.items():
            moved = _changed(before[name], trainable.params)
            assert moved == (name in updated), f"{objective}/{init}/{phase}: {name} {'moved' if moved else 'did not move'}"
            ever_moved |= {name} if moved else set()
    assert ever_moved == set(tr.objective.trains), "every trained network (the GAN head included) must move in some phase"
    assert not _changed(t0, teacher_params) and all(not p.requires_grad for p in teacher_params)


# -------------------------------------------------------------------------------------- recipes

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"
OURS = ["dmd2", "vsd", "sid"]


def test_every_teacher_has_our_recipes():
    for teacher in ("digits-unet", "digits-sd", "digits-flow"):
        names = {p.stem for p in (RECIPES / teacher).glob("*.yaml")}
        assert names >= set(OURS) | {f"{o}-4step" for o in OURS}, teacher
    assert {p.stem for p in (RECIPES / "toy2d").glob("*.yaml")} >= set(OURS)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")))
def test_every_recipe_parses(path, monkeypatch):
    """load_config reads no weights: it must work even where a teacher is not trained yet."""
    import stepdistill.teachers as teachers

    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: pytest.fail("load_config loaded a teacher"))
    cfg = load_config(str(RECIPES / path))
    assert cfg.objective is not None
    if Path(path).stem.split("-")[0] in OURS:
        assert cfg.objective.registry_name == Path(path).stem.split("-")[0]
        if Path(path).stem.endswith("4step"):
            assert len(cfg.student.times) == 4


@pytest.mark.parametrize("factory", [lambda: tiny_unet2d(num_classes=10), tiny_dit], ids=["unet2d", "dit"])
def test_second_lora_adapter_gets_the_same_layers(factory):
    """LoRA student + LoRA fake score on one base: the second adapter must not miss the wrapped layers."""
    from stepdistill.training.networks import add_lora

    den = wrap(factory(), VP, "epsilon")
    student = add_lora(den, "student", 2, 2)
    fake = add_lora(den, "fake_score", 2, 2)
    assert sum(p.numel() for p in fake) == sum(p.numel() for p in student) > 0
