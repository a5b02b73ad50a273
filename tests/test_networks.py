"""Student and fake score from a teacher: full copies and LoRA views on one shared base."""

import torch

from conftest import tiny_unet2d
from stepdistill.adapters import DiffusersDenoiser
from stepdistill.training.networks import Net, add_lora, full_copy
from stepdistill.sampling import ddim_sample, few_step_sample
from stepdistill.schedules import VPSchedule


def teacher():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    return DiffusersDenoiser(tiny_unet2d(num_classes=10).eval(), VPSchedule.from_scheduler(DDPMScheduler()), "epsilon")


def test_lora_views_share_one_base():
    base = teacher()
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.7]), {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        before = base(x, t, cond)
    n_base = sum(p.numel() for p in base.parameters())
    student_params = add_lora(base, "student", rank=2, alpha=2)
    fake_params = add_lora(base, "fake_score", rank=2, alpha=2)
    assert student_params and fake_params and not set(map(id, student_params)) & set(map(id, fake_params))
    added = sum(p.numel() for p in student_params + fake_params)
    assert sum(p.numel() for p in base.parameters()) == n_base + added  # one base, two small adapters
    t_view, s_view, f_view = (Net(base, base.schedule, adapter=a) for a in ("", "student", "fake_score"))
    with torch.no_grad():
        for p in student_params:  # perturb the student adapter only
            p.add_(0.3 * torch.randn_like(p))
        out_t, out_s, out_f = t_view(x, t, cond), s_view(x, t, cond), f_view(x, t, cond)
    assert torch.allclose(out_t, before, atol=1e-6), "adapters off must give the teacher"
    assert torch.allclose(out_f, before, atol=1e-6), "a fresh (B = 0) adapter starts at the teacher"
    assert not torch.allclose(out_s, before, atol=1e-3)
    # switching views leaves requires_grad alone (the trainer owns it)
    assert all(p.requires_grad for p in student_params + fake_params)


def test_full_copy_is_independent_fp32_and_trainable():
    base = teacher().to(torch.bfloat16).requires_grad_(False)
    clone = full_copy(base)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in clone.parameters())
    assert all(not p.requires_grad for p in base.parameters())
    assert next(clone.parameters()).data_ptr() != next(base.parameters()).data_ptr()


def test_few_step_and_ddim_sampling_shapes():
    den = teacher()
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(3, 1, 8, 8, generator=g), {"class_labels": torch.tensor([0, 1, 2])}
    one = few_step_sample(den, noise, cond, [1.0], g)
    four = few_step_sample(den, noise, cond, [1.0, 0.75, 0.5, 0.25], g)
    ode = ddim_sample(den, noise, cond, 4, {"class_labels": torch.full((3,), 10)}, guidance_scale=2.0)
    for out in (one, four, ode):
        assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    # the deterministic solver is deterministic; the few-step sampler re-noises from its generator
    assert torch.equal(ode, ddim_sample(den, noise, cond, 4, {"class_labels": torch.full((3,), 10)}, guidance_scale=2.0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(few_step_sample(den, noise, cond, [1.0, 0.5], g1), few_step_sample(den, noise, cond, [1.0, 0.5], g2))


def test_full_copy_is_deterministic_for_label_dropout_models():
    """diffusers' LabelEmbedding drops 10% of labels in train mode; a student copy must not."""
    from conftest import tiny_dit

    from stepdistill.training.networks import full_copy

    dit = tiny_dit().eval()
    student = full_copy(dit)
    assert not student.training
    x, t, labels = torch.randn(64, 4, 8, 8), torch.full((64,), 500.0), torch.arange(64) % 10
    a = student(x, timestep=t, class_labels=labels).sample
    b = student(x, timestep=t, class_labels=labels).sample
    assert torch.equal(a, b)
