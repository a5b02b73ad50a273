"""Null class of class-conditional UNet2DModel teachers: never guessed from num_class_embeds (issue 17)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_unet2d
from stepdistill.config import load_config
from stepdistill.conditioning import ClassLabels, guided
from stepdistill.contract import StepdistillError
from stepdistill.teachers import load_teacher
from stepdistill.training.run import build_run

FAST = ["train.batch_size=4", "train.steps=1", "train.log_every=1", "train.sample_every=0", "train.num_sample_images=4"]


def bare_folder(tmp_path, embeds: int):
    """A diffusers class-conditional UNet2DModel folder with ``embeds`` class embeddings and no stepdistill metadata."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    folder = tmp_path / f"bare-unet-{embeds}"
    tiny_unet2d(num_classes=embeds - 1).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    assert not (folder / "stepdistill_teacher.json").exists()
    return folder


def test_ten_embeddings_without_metadata_are_ten_real_classes(tmp_path, capsys):
    folder = bare_folder(tmp_path, 10)
    teacher = load_teacher(str(folder))
    cond = teacher.conditioner
    assert isinstance(cond, ClassLabels) and (cond.num_classes, cond.null_class, teacher.num_classes) == (10, None, 10)
    labels, null = cond(2000, torch.Generator().manual_seed(0))
    assert null is None
    assert sorted(labels["class_labels"].unique().tolist()) == list(range(10)), "digit 9 must be drawn as a condition"
    err = capsys.readouterr().err
    assert err.count("no null class") == 1 and "classifier-free guidance is off" in err
    load_teacher(str(folder))
    assert "no null class" not in capsys.readouterr().err, "said once per folder"


def test_guidance_on_a_teacher_without_null_class_is_a_one_line_error(tmp_path):
    folder = bare_folder(tmp_path, 10)
    for recipe, key in [("digits-unet/dmd", "objective.guidance_scale=2"), ("digits-unet/sid", "objective.guidance_scale=1.5"),
                        ("digits-unet/sid", "objective.fake_guidance_scale=0")]:
        cfg = load_config(recipe, FAST + [f"teacher.name={folder}", "objective.guidance_scale=1",
                                          "objective.fake_guidance_scale=1", key])
        with pytest.raises(StepdistillError, match=r"teacher\.null_class") as e:
            build_run(cfg, log=lambda _m: None)
        assert "\n" not in str(e.value) and key.split("=")[0] in str(e.value)
    cfg = load_config("digits-unet/dmd", FAST + [f"teacher.name={folder}", "objective.guidance_scale=1"])
    assert build_run(cfg, log=lambda _m: None).teacher.conditioner.null_class is None  # guidance 1 runs


@pytest.mark.parametrize("recipe", ["digits-unet/vsd-4step", "digits-unet/lcm", "digits-unet/scm-ladd"])
def test_a_recipes_guidance_is_turned_off_with_one_line_on_a_teacher_without_null_class(tmp_path, recipe):
    """Only teacher.name changed: every guidance scale the recipe asks for goes back to 'off', said in one line."""
    from stepdistill.adapters.families.class_conditional import _guidance_fields

    folder = bare_folder(tmp_path, 10)
    cfg = load_config(recipe, FAST + [f"teacher.name={folder}"])
    asked = [path for _n, _f, path, v, _d, _r in _guidance_fields(cfg.objective, "objective") if v not in (0, 1)]
    assert asked, f"{recipe} no longer guides; pick a recipe that does"
    lines: list[str] = []
    build_run(cfg, log=lines.append)
    said = [m for m in lines if "no null class" in m]
    assert len(said) == 1 and "\n" not in said[0] and all(p + "=" in said[0] for p in asked), said
    assert all(v in (0, 1) for _n, _f, _p, v, _d, _r in _guidance_fields(cfg.objective, "objective"))
    pools = [getattr(n, "_data", None) for n, *_ in _guidance_fields(cfg.objective, "objective")]
    assert all(p is None or p.guidance_scale == 1 for p in pools), "teacher-made sample pools are rebuilt without CFG"


def test_turned_off_guidance_is_recorded_and_a_resume_agrees(tmp_path):
    import yaml

    from stepdistill.training.trainer import Trainer

    folder = bare_folder(tmp_path, 10)
    over = FAST + [f"teacher.name={folder}"]
    Trainer(load_config("digits-unet/vsd-4step", over), tmp_path / "run", progress=False).run()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["objective"]
    assert saved["guidance_scale"] == 1  # the recipe's 2, turned off
    summary = Trainer(load_config("digits-unet/vsd-4step", over + ["train.steps=2"]), tmp_path / "run", resume=True, progress=False).run()
    assert summary["steps"] == 2


def test_teacher_null_class_enables_cfg_on_eleven_embeddings(tmp_path):
    from stepdistill.training.trainer import Trainer

    folder = bare_folder(tmp_path, 11)
    assert load_teacher(str(folder)).conditioner.null_class is None  # 11 real classes without the setting
    cfg = load_config("digits-unet/dmd", FAST + [f"teacher.name={folder}", "teacher.null_class=10", "objective.guidance_scale=2"])
    assert cfg.teacher.null_class == 10
    run = build_run(cfg, log=lambda _m: None)
    cond = run.teacher.conditioner
    assert (cond.num_classes, cond.null_class) == (10, 10)
    c, n = cond(6, torch.Generator().manual_seed(1))
    assert n["class_labels"].tolist() == [10] * 6 and int(c["class_labels"].max()) < 10
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 0.5)
    den = run.teacher.denoiser
    want = den(x, t, n) + 2.0 * (den(x, t, c) - den(x, t, n))
    assert torch.allclose(guided(den, x, t, c, n, 2.0), want, atol=1e-5)
    Trainer(cfg, tmp_path / "run", progress=False).run()  # one guided round trains


def test_null_class_setting_is_checked(tmp_path):
    assert load_config("digits-unet/dmd", ["teacher.null_class=null"]).teacher.null_class is None
    with pytest.raises(StepdistillError, match="teacher.null_class"):
        load_config("digits-unet/dmd", ["teacher.null_class=-1"])
    with pytest.raises(StepdistillError, match="teacher.null_class"):
        load_config("digits-unet/dmd", ["teacher.null_class=ten"])
    folder = bare_folder(tmp_path, 10)
    with pytest.raises(StepdistillError, match="must be an embedding after"):
        load_teacher(str(folder), null_class=3)  # inside the drawn labels 0..8
    with pytest.raises(StepdistillError, match="must be an embedding after"):
        load_teacher(str(folder), null_class=10)  # no such embedding
