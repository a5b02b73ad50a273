"""Hybrid inference (issue 16 item 2): teacher for the first k steps, then the student."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.evaluation.cli import samplers_for
from stepdistill.evaluation.cost import NFECounter
from stepdistill.evaluation.hybrid import handover_time, hybrid_student_times, teacher_solver
from stepdistill.evaluation.seeding import make_conditions
from stepdistill.evaluation.sources import hybrid_sampler, student_sampler
from stepdistill.teachers import load_teacher
from stepdistill.training.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round one-step DMD student of the embedded digits-unet (student.times = [0.95])."""
    out = tmp_path_factory.mktemp("hybrid") / "run"
    cfg = load_config("digits-unet/dmd", ["train.steps=2", "train.batch_size=2", "train.sample_every=0", "train.log_every=1",
                                          "objective.critic_ratio=1"])
    Trainer(cfg, out, progress=False).run()
    return out


def _conds(n, sampler):
    return make_conditions(n, 0, sampler.num_classes, sampler.prompts)


def test_k0_is_the_student_alone_exactly(run):
    student, hybrid = student_sampler(run), hybrid_sampler(run, teacher_steps=0)
    conds = _conds(3, student)
    assert torch.equal(student.generate([0, 1, 2], conds), hybrid.generate([0, 1, 2], conds))
    assert hybrid.info["hybrid"]["nfe"] == 1 and hybrid.guidance_scale is None


def test_hybrid_is_finite_seeded_and_counts_its_nfe(run):
    hybrid, student = hybrid_sampler(run, teacher_steps=1, schedule_steps=4), student_sampler(run)
    conds = _conds(3, hybrid)
    with NFECounter(hybrid.networks) as counter:
        x = hybrid.generate([0, 1, 2], conds)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    assert counter.rows / 3 == 1 * 2 + 1 == hybrid.info["hybrid"]["nfe"]  # one CFG teacher step (2 rows) + one student step
    assert torch.equal(x, hybrid.generate([0, 1, 2], conds))  # deterministic per seed
    assert torch.allclose(x[1:2], hybrid.generate([1], conds.take([1])), atol=1e-5)  # and independent of the batch
    assert (x - student.generate([0, 1, 2], conds)).abs().max() > 1e-3  # the teacher's step changes the sample
    info = hybrid.info["hybrid"]
    assert info["teacher_timesteps"] == [999.0] and info["handover_time"] == pytest.approx(749 / 999)
    assert info["student_times_after_handover"] == [pytest.approx(749 / 999)]
    assert "hybrid" in hybrid.label and hybrid.kind == "hybrid"


def test_handover_follows_the_teachers_ddim_grid():
    teacher = load_teacher("digits-unet")
    sched = teacher_solver(teacher, 4)
    assert [int(t) for t in sched.timesteps] == [999, 749, 499, 249]
    assert handover_time(sched, teacher.denoiser.schedule, 2) == pytest.approx(499 / 999)
    assert hybrid_student_times([1.0, 0.75, 0.5, 0.25], 0.6) == (0.6, 0.5, 0.25)  # a 4-step student keeps its later times


def test_eval_yields_student_and_hybrid_rows(run):
    kinds = [s.kind for s in samplers_for(str(run), [1], hybrid=(1, 4))]
    assert kinds == ["student", "hybrid"]


@pytest.mark.parametrize("args", [["--hybrid-teacher-steps", "4", "--hybrid-schedule", "4"],
                                  ["--hybrid-teacher-steps", "-1"]])
def test_k_outside_the_schedule_is_a_one_line_error(run, tmp_path, capsys, args):
    try:
        code = main(["eval", str(run), "--out", str(tmp_path / "e"), "--num-samples", "8", *args])
    except SystemExit as e:  # argparse's type check of a negative K: its one-line usage error
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--hybrid-teacher-steps" in err and "error: " in err and "\n" not in err


def test_hybrid_needs_a_run_directory(tmp_path, capsys):
    assert main(["eval", "digits-unet", "--out", str(tmp_path / "e"), "--hybrid-teacher-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run directory" in err and "\n" not in err


# ----------------------------------------------------------------------------- exported pipelines

from test_export import sd_dir  # noqa: E402,F401  (the tiny SD teacher folder fixture)


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    from stepdistill.export import export_run

    out = tmp_path_factory.mktemp("hybrid-export") / "export"
    export_run(run, out)
    return out


def test_exported_class_conditional_pipeline_hybrid_matches_the_run(run, export):
    """The exported pipeline's own teacher option (teacher=, teacher_scheduler=, teacher_steps=) gives the
    run directory's hybrid samples, and counts one CFG teacher step (2 rows) + one student step."""
    from stepdistill.evaluation.hybrid import pipeline_hybrid_sampler

    ours = hybrid_sampler(run, teacher_steps=1, schedule_steps=4)
    theirs = pipeline_hybrid_sampler(export, 1, teacher_steps=1, schedule_steps=4, trust_remote_code=True)
    conds = _conds(3, ours)
    with NFECounter(theirs.networks) as counter:
        y = theirs.generate([0, 1, 2], conds)
    x = ours.generate([0, 1, 2], conds)
    assert (x - y).abs().max() < 2e-5 * 255  # the pipeline returns [0, 1] floats: same up to float rounding
    assert counter.rows / 3 == 2 + 1 == theirs.info["hybrid"]["nfe"] == ours.info["hybrid"]["nfe"]
    assert theirs.info["hybrid"]["through"] == "pipeline teacher option" and theirs.kind == "hybrid"
    alone = student_sampler(run).generate([0, 1, 2], conds)
    assert (alone - y).abs().max() > 1e-2  # the teacher step changed the samples


def test_class_conditional_pipeline_hybrid_option_without_stepdistill(export):
    """The pipeline file on its own: teacher network and scheduler passed in, bad k is a ValueError."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    from stepdistill.teachers import resolve_teacher_folder

    folder = resolve_teacher_folder("digits-unet")
    pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    teacher, sched = UNet2DModel.from_pretrained(folder / "unet"), DDPMScheduler.from_pretrained(folder / "scheduler")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    kw = dict(class_labels=[3, 7], output_type="pt", teacher=teacher, teacher_scheduler=sched, teacher_schedule=4,
              teacher_guidance_scale=2.0, teacher_null_class=10)
    a = pipe(generator=gens(), teacher_steps=1, **kw).images
    assert torch.equal(a, pipe(generator=gens(), teacher_steps=1, **kw).images) and torch.isfinite(a).all()
    assert list(pipe.scheduler.timesteps) == [749]  # handed over at the DDIM step's target, 999 - 1000 // 4
    with pytest.raises(ValueError, match="teacher_steps=4 does not fit"):
        pipe(generator=gens(), teacher_steps=4, **kw)
    with pytest.raises(ValueError, match="needs the teacher network"):
        pipe(class_labels=[3], teacher_steps=1)


def test_exported_stock_sd_pipeline_hybrid_matches_the_run(tmp_path, sd_dir):
    """A stock StableDiffusionPipeline export: the teacher's x_s goes in as latents, the hand-over
    timestep as timesteps; samples equal the run directory's hybrid."""
    from stepdistill.evaluation.hybrid import pipeline_hybrid_sampler
    from stepdistill.export import export_run

    cfg = load_config("digits-unet/dmd", [f"teacher.name={sd_dir}", "student.times=[1.0]", "train.steps=2", "train.batch_size=2",
                                          "train.sample_every=0", "train.log_every=1", "objective.critic_ratio=1",
                                          "student.lr=1e-3", "fake_score.lr=1e-3"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    export_run(tmp_path / "run", tmp_path / "export")
    ours = hybrid_sampler(tmp_path / "run", teacher_steps=1, schedule_steps=4, guidance_scale=1.0)
    theirs = pipeline_hybrid_sampler(tmp_path / "export", 1, teacher_steps=1, schedule_steps=4, guidance_scale=1.0)
    conds = _conds(2, ours)
    x, y = ours.generate([0, 1], conds), theirs.generate([0, 1], conds)
    assert (x - y).abs().max() < 1e-4
    assert theirs.info["hybrid"]["through"] == "latents + timesteps" and theirs.info["hybrid"]["nfe"] == 2


def test_eval_yields_pipeline_and_hybrid_rows(export):
    kinds = [s.kind for s in samplers_for(str(export), [1], hybrid=(1, 4), trust_remote_code=True)]
    assert kinds == ["pipeline", "hybrid"]


def test_hybrid_of_an_export_without_its_teacher_is_a_one_line_error(export, tmp_path, capsys):
    meta = json.loads((export / "stepdistill_export.json").read_text())
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(export, moved)
    (moved / "stepdistill_export.json").write_text(json.dumps(meta | {"teacher": str(tmp_path / "gone")}))
    assert main(["eval", str(moved), "--out", str(tmp_path / "e"), "--hybrid-teacher-steps", "1", "--trust-remote-code",
                 "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "--hybrid-teacher names another" in err and "\n" not in err


def test_hybrid_teacher_flag_overrides_the_exports_teacher(export, tmp_path):
    import shutil

    from stepdistill.evaluation.hybrid import pipeline_hybrid_sampler

    moved = tmp_path / "moved"
    shutil.copytree(export, moved)
    meta = json.loads((moved / "stepdistill_export.json").read_text())
    (moved / "stepdistill_export.json").write_text(json.dumps(meta | {"teacher": str(tmp_path / "gone")}))
    sampler = pipeline_hybrid_sampler(moved, 1, 1, 4, trust_remote_code=True, teacher="digits-unet")
    assert sampler.info["teacher"] == "digits-unet"
