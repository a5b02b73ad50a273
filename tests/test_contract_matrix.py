"""The contract over the registries: every registered objective x every registered family.

For each pair, on a tiny random network of the family: every phase's loss is finite, the
phase's networks (and only they) get finite gradients, and the teacher's weights get none.
A family or objective registered without an entry here fails ``test_every_registered_...``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import cond_for, tiny_dit, tiny_flux, tiny_pixart, tiny_sana, tiny_sd3, tiny_sdxl_unet, tiny_unet2d, tiny_unet2d_condition
from stepdistill.adapters import families, wrap
from stepdistill.config import build_objective_config
from stepdistill.objectives.base import Batch, Nets
from stepdistill.objectives.registry import registered
from stepdistill.teachers import Teacher

VP = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
FAMILIES = {  # family -> (tiny network, schedule, prediction type, cond key for conftest.cond_for, sample shape)
    "unet2d": (lambda: tiny_unet2d(num_classes=10), VP, "epsilon", "unet2d_class", (1, 8, 8)),
    "dit": (tiny_dit, VP, "epsilon", "dit", (4, 8, 8)),
    "sd": (tiny_unet2d_condition, VP, "epsilon", "sd", (4, 8, 8)),
    "sdxl": (tiny_sdxl_unet, VP, "epsilon", "sdxl", (4, 8, 8)),
    "sd3": (tiny_sd3, FLOW, None, "sd3", (4, 8, 8)),
    "flux": (tiny_flux, FLOW, None, "flux", (1, 4, 4)),  # unpacked latents: 4 packed channels = 1 channel x 2 x 2
    "sana": (tiny_sana, FLOW, None, "sana", (4, 8, 8)),
    "pixart": (tiny_pixart, VP, "epsilon", "pixart", (4, 8, 8)),
}
OBJECTIVES = {  # a small config of every objective (and variants)
    "dmd": {"name": "dmd", "guidance_scale": 2.0, "critic_ratio": 1},
    "dmd2": {"name": "dmd2", "guidance_scale": 2.0, "critic_ratio": 1},
    "dmd2-gan": {"name": "dmd2", "guidance_scale": 2.0, "gan_weight": 0.01, "critic_ratio": 1},
    "dmd2-split": {"name": "dmd2", "guidance_scale": 2.0, "cfg_split": True},
    "vsd": {"name": "vsd", "guidance_scale": 2.0, "guidance_scale_max": 4.0},
    "sid": {"name": "sid", "guidance_scale": 2.0, "fake_guidance_scale": 2.0, "fake_train_guidance_scale": 2.0},
    "lcm": {"name": "lcm", "num_ddim_steps": 4, "guidance_scale_max": 2.0, "synthetic_steps": 2, "synthetic_pool": 4},
    "scm": {"name": "scm", "guidance_scale_max": 2.0, "synthetic_steps": 2, "synthetic_pool": 0},
    "ladd": {"name": "ladd", "synthetic_steps": 2, "synthetic_pool": 0, "guidance_scale": 2.0},
    "compose": {"name": "compose", "parts": [{"name": "scm", "weight": 1.0, "synthetic_steps": 2, "synthetic_pool": 0},
                                             {"name": "ladd", "weight": 0.1, "synthetic_steps": 2, "synthetic_pool": 0}]},
}


def test_every_registered_family_and_objective_is_in_the_matrix():
    assert set(families()) == set(FAMILIES), "a registered family needs a tiny network here"
    assert set(registered()) == {c["name"] for c in OBJECTIVES.values()}, "a registered objective needs a small config here"


def _null_like(cond):
    return {k: torch.zeros_like(v) if v.is_floating_point() else torch.full_like(v, 10) for k, v in cond.items()}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_objective_on_every_family(objective, family):
    factory, sched, pred, key, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = factory().eval().requires_grad_(False)
    teacher = wrap(model, sched, pred)
    assert teacher.family == family
    student = copy.deepcopy(teacher).requires_grad_(True)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    conditions = lambda n, g: (cond_for(key, n, g), _null_like(cond_for(key, n, g)))  # noqa: E731
    cond, null = conditions(2, torch.Generator().manual_seed(0))
    obj = build_objective_config(copy.deepcopy(OBJECTIVES[objective]))
    extra = obj.extra_networks(Teacher("tiny", teacher, conditions, shape)) if hasattr(obj, "extra_networks") else {}
    nets = Nets(teacher=teacher, student=student, student_times=(1.0, 0.5), fake_score=fake, extra=extra)
    batch = Batch(2, shape, cond, null, real=torch.randn(2, *shape), conditions=conditions)
    owners = {"student": list(student.parameters()), "fake_score": list(fake.parameters())}
    owners |= {n: list(m.parameters()) for n, m in extra.items()}
    rng = torch.Generator().manual_seed(1)
    for phase in obj.phases:
        trained = obj.phase_updates(phase)
        for name, params in owners.items():  # the trainer's isolation
            for p in params:
                p.requires_grad_(name in trained)
                p.grad = None
        out = obj.loss(phase, nets, batch, rng)
        assert torch.isfinite(out.loss), f"{objective}/{phase} on {family}: {out.loss}"
        out.loss.backward()
        for name in trained:
            grads = [p.grad for p in owners[name] if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), f"{objective}/{phase} on {family}: no finite grads for {name}"
        for name, params in owners.items():
            if name not in trained:
                assert all(p.grad is None for p in params), f"{objective}/{phase} on {family}: {name} got a gradient"
        assert all(p.grad is None for p in model.parameters()), "the teacher's weights must get no gradient"
