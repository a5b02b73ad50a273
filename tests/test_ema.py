"""Student EMA (issue 17): SiD's ramped half-life through diffusers' EMAModel, kept apart from the raw
weights, used by export and eval, resumed exactly; on in the score/sCM digits recipes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import load_config
from stepdistill.training.checkpoint import latest_checkpoint
from stepdistill.training.trainer import Trainer

FAST = ["train.batch_size=4", "train.log_every=1", "train.sample_every=0", "train.num_sample_images=4",
        "objective.critic_ratio=1", "train.checkpoint_every=3"]


def cfg_for(folder, steps):
    return load_config("digits-unet/dmd", FAST + [f"teacher.name={folder}", f"train.steps={steps}"])


def test_ramp_is_sids_half_life():
    """EMAModel with power 1, inv_gamma ln2/r: half-life in updates -> r x updates (SiD: 0.05 x images seen)."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999999, use_ema_warmup=True, power=1.0,
                   inv_gamma=math.log(2) / 0.05)
    for n in (200, 1000, 5000):
        decay = ema.get_decay(n + 1)
        half_life = math.log(0.5) / math.log(decay)
        assert half_life == pytest.approx(0.05 * n, rel=0.05), (n, half_life)
        assert 1 - decay == pytest.approx(1 - 0.5 ** (1 / (0.05 * n)), rel=0.05)  # SiD: beta = 0.5 ** (batch / halflife_img)


def test_score_and_scm_recipes_evaluate_an_ema():
    from stepdistill.config import list_recipes

    for name in list_recipes():
        if name.startswith("digits-") and name.split("/")[1].split("-")[0] in ("dmd", "dmd2", "sid", "vsd", "scm"):
            s = load_config(name).student
            assert s.ema_decay == 0.999 and s.ema_rampup == 0.05, name


def test_three_rounds_keep_an_ema_export_writes_it_and_resume_is_exact(tmp_path, unet_teacher_dir):
    from stepdistill.export import export_run
    from stepdistill.training.run import load_student

    run = tmp_path / "run"
    tr = Trainer(cfg_for(unet_teacher_dir, 3), run, progress=False)
    assert tr.ema is not None and tr.ema.use_ema_warmup
    tr.run()
    raw = tr.trainables["student"].params
    assert tr.ema.optimization_step == 3
    assert tr.ema.cur_decay_value == pytest.approx(1 - 1 / (1 + 2 / (math.log(2) / 0.05)))  # step 2 of the ramp
    assert any(not torch.equal(e, p) for e, p in zip(tr.ema.shadow_params, raw)), "EMA must differ from the raw weights"

    ckpt = latest_checkpoint(run)
    extra = load_file(str(ckpt / "extra.safetensors"))
    from stepdistill.training.networks import inner_model

    names = [n for n, _ in inner_model(tr.trainables["student"].module).named_parameters()]
    ema_by_name = {n: extra[f"ema.{i}"] for i, n in enumerate(names)}
    assert all(torch.equal(ema_by_name[n], e) for n, e in zip(names, tr.ema.shadow_params))

    loaded = load_student(run)  # what eval samples from
    assert loaded.info["ema"]
    assert all(torch.equal(p, ema_by_name[n]) for n, p in inner_model(loaded.trainable.module).named_parameters())

    meta = export_run(run, tmp_path / "export")
    assert meta["ema"] and "EMA weights" in (tmp_path / "export" / "README.md").read_text()
    exported = load_file(str(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(names)
    assert all(torch.equal(exported[n], ema_by_name[n]) for n in names), "export must write the EMA weights"
    raw_export = export_run(run, tmp_path / "export-raw", use_ema=False)
    assert not raw_export["ema"]
    raw_w = load_file(str(tmp_path / "export-raw" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(raw_w[n], p.detach()) for n, p in zip(names, raw))
    assert any(not torch.equal(raw_w[n], exported[n]) for n in names)

    full = Trainer(cfg_for(unet_teacher_dir, 5), tmp_path / "full", progress=False)
    full.run()
    part = tmp_path / "part"
    Trainer(cfg_for(unet_teacher_dir, 5), part, progress=False).run(until=3)
    resumed = Trainer(cfg_for(unet_teacher_dir, 5), part, resume=True, progress=False)
    assert resumed.step == 3 and resumed.ema.optimization_step == 3
    resumed.run()
    assert resumed.ema.optimization_step == full.ema.optimization_step == 5
    assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params)), "EMA after resume"
    assert all(torch.equal(a, b) for a, b in zip(full.trainables["student"].params, resumed.trainables["student"].params))
