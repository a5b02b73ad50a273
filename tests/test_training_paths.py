"""Training paths beyond the default: bf16, accumulation, K-step + regression, prompts, LoRA."""

import pytest

from conftest import minilm_text_side, tiny_unet2d_condition
from stepdistill.config import load_config
from stepdistill.training.trainer import Trainer

FAST = ["train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1", "train.batch_size=16",
        "student.fit_steps=20", "student.mlp_hidden=32"]


def run(tmp_path, *overrides, recipe="toy2d/dmd"):
    tr = Trainer(load_config(recipe, FAST + list(overrides)), tmp_path / "run", progress=False)
    summary = tr.run()
    return tr, summary


def last_metrics(tr):
    import json

    return json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("extra", [["train.mixed_precision=bf16"], ["train.grad_accum=2"]])
def test_bf16_and_accumulation_run_finite(tmp_path, extra):
    tr, summary = run(tmp_path, "train.steps=3", *extra)
    assert summary["nonfinite"] == {} and tr.updates["student"] == 3
    assert all(v == v for v in last_metrics(tr).values())


def test_k_step_student_with_regression_loss(tmp_path):
    tr, _ = run(tmp_path, "train.steps=3", "student.times=[1.0,0.6,0.3]", "objective.regression_weight=0.25",
                "objective.regression_pairs=16", "objective.regression_steps=4")
    metrics = last_metrics(tr)
    assert metrics["student/regression_loss"] > 0 and tr.objective._pairs[0].shape == (16, 2)
    assert tr.generate(8).shape == (8, 2)


def test_regression_pairs_start_at_the_students_time(tmp_path):
    """DMD's teacher ODE pairs start from pure noise at the student's own first time (here 0.6), not t = 1."""
    from stepdistill.sampling import ddim_sample

    tr, _ = run(tmp_path, "train.steps=1", "student.times=[0.6]", "objective.regression_weight=0.25",
                "objective.regression_pairs=8", "objective.regression_steps=4")
    z, y, cond = tr.objective._pairs
    teacher = tr.nets.teacher
    same = ddim_sample(teacher, z, cond, 4, None, tr.objective.guidance_scale, t_max=0.6)
    from_one = ddim_sample(teacher, z, cond, 4, None, tr.objective.guidance_scale, t_max=1.0)
    assert (y - same).abs().max() < 2e-3 < (y - from_one).abs().max(), ((y - same).abs().max(), (y - from_one).abs().max())


def test_bad_student_times(tmp_path):
    from stepdistill.contract import StepdistillError

    with pytest.raises(StepdistillError, match="strictly decreasing"):
        Trainer(load_config("toy2d/dmd", FAST + ["student.times=[0.5,0.9]"]), tmp_path / "r", progress=False)


def test_text_teacher_with_prompt_file_and_lora(tmp_path):
    """A tiny UNet2DConditionModel teacher on the offline MiniLM text encoder, prompts from a file,
    LoRA student and fake score on the shared base, teacher CFG with the empty prompt."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = tmp_path / "tiny-sd"
    unet = tiny_unet2d_condition()
    UNet2DConditionModel.from_config(dict(unet.config, cross_attention_dim=384)).save_pretrained(folder / "unet")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    minilm_text_side(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\n\nthe number 7, written by hand\n")
    tr, summary = run(tmp_path, f"teacher.name={folder}", f"data.conditions=prompts:{prompts}", "student.init=lora",
                      "fake_score.init=lora", "student.lora_rank=2", "fake_score.lora_rank=2", "train.steps=2",
                      "train.batch_size=2", "objective.guidance_scale=3")
    assert summary["nonfinite"] == {}
    batch = tr.sampler.next()
    assert batch.cond["prompt_embeds"].shape == (2, 16, 384) and batch.null_cond["prompt_embeds"].shape == (2, 16, 384)
    assert tr.trainables["student"].module is tr.trainables["fake_score"].module  # one shared base


def test_real_data_with_labels_and_teacher_cfg(tmp_path):
    """Real samples carry their labels beside (not inside) cond, so CFG batching still works."""
    tr, summary = run(tmp_path, "teacher.name=analytic:ring8-cond", "data.real=teacher", "objective.guidance_scale=2",
                      "train.steps=2")
    batch = tr.sampler.next()
    assert summary["nonfinite"] == {} and batch.real.shape == (16, 2) and batch.real_labels.shape == (16,)
    assert set(batch.cond) == {"class_labels"}
