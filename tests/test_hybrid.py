"""Hybrid inference (issue 16 item 2): teacher for the first k steps, then the student."""

from __future__ import annotations

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
    assert main(["eval", str(run), "--out", str(tmp_path / "e"), "--num-samples", "8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --hybrid-teacher-steps") and "\n" not in err


def test_hybrid_needs_a_run_directory(tmp_path, capsys):
    assert main(["eval", "digits-unet", "--out", str(tmp_path / "e"), "--hybrid-teacher-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run directory" in err and "\n" not in err
