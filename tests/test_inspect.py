"""``stepdistill inspect`` (issue 16 item 3): x0 after every step, teacher beside student."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.export import export_run
from stepdistill.inspection import hybrid_trajectory, inspect_model, make_rows, student_trajectory
from stepdistill.teachers import load_teacher
from stepdistill.training.run import load_student
from stepdistill.training.trainer import Trainer

TWO_STEP = [0.95, 0.5]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round two-step DMD student of the embedded digits-unet."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = load_config("digits-unet/dmd", [f"student.times={TWO_STEP}", "train.steps=2", "train.batch_size=2",
                                          "train.sample_every=0", "train.log_every=1", "objective.critic_ratio=1"])
    Trainer(cfg, out, progress=False).run()
    return out


def _steps(numbers, i):
    return numbers["trajectories"][i]["steps"]


def test_teacher_alone(tmp_path):
    numbers = inspect_model("digits-unet", tmp_path / "t.png", steps=3, seeds=[0, 1, 2], labels=[3])
    assert Image.open(tmp_path / "t.png").size[0] > 100
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(json.dumps(numbers))
    assert len(numbers["trajectories"]) == 1 and len(numbers["rows"]) == 3
    steps = _steps(numbers, 0)
    assert [s["t"] for s in steps] == [1.0, pytest.approx(666 / 999, abs=1e-6), pytest.approx(332 / 999, abs=1e-6)]  # trailing: [999, 666, 332]
    assert steps[-1]["distance_to_teacher_final"] == 0.0 and steps[0]["distance_to_teacher_final"] > 0.1
    assert all(0 < s["diversity"] < 2 for s in steps)


def test_run_directory_through_the_cli(run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["inspect", str(run), "--steps", "2", "--seeds", "0", "1", "--labels", "3", "7", "--out", str(out),
                 "--hybrid-teacher-steps", "1"]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert Image.open(out).size[0] > 100 and numbers["kind"] == "student" and len(numbers["trajectories"]) == 3
    student = numbers["trajectories"][1]
    assert student["name"] == "student 2 steps" and student["times"] == pytest.approx([949 / 999, 499 / 999])
    assert all(s["diversity_per_condition"].keys() == {"class 3", "class 7"} for s in student["steps"])
    assert all(s["distance_to_teacher_final"] > 0 for s in student["steps"])


def test_student_steps_match_its_sampler(run):
    """The recorded last step is the student's sample; the first is its one-step prediction."""
    from stepdistill.evaluation.sources import student_sampler

    loaded = load_student(run)
    rows = make_rows(loaded.teacher, [4, 5], [1])
    traj = student_trajectory(loaded, rows)
    assert torch.equal(traj.x0[-1], student_sampler(run).generate(rows.row_seeds, rows.conds))
    assert not torch.equal(traj.x0[0], traj.x0[1])


def test_hybrid_panel_ends_at_the_hybrid_sample(run):
    from stepdistill.evaluation.sources import hybrid_sampler

    loaded = load_student(run)
    rows = make_rows(loaded.teacher, [0, 1], [5])
    traj = hybrid_trajectory(loaded, rows, 1, 4)  # teacher at 999, hand-over at 749, the student's 749 and 499
    assert traj.times == pytest.approx([1.0, 749 / 999, 499 / 999]) and len(traj.x0) == 3
    assert torch.equal(traj.x0[-1], hybrid_sampler(run, 1, 4).generate(rows.row_seeds, rows.conds))


def test_exported_pipeline_equals_the_run(run, tmp_path):
    export_run(run, tmp_path / "export")
    a = inspect_model(str(run), tmp_path / "run.png", steps=2, seeds=[0, 1], labels=[2])
    b = inspect_model(str(tmp_path / "export"), tmp_path / "pipe.png", steps=2, seeds=[0, 1], labels=[2], trust_remote_code=True)
    assert b["kind"] == "pipeline" and b["trajectories"][1]["times"] == pytest.approx(a["trajectories"][1]["times"])
    for x, y in zip(_steps(a, 1), _steps(b, 1)):  # per step: the pipeline's own scheduler replays the student
        assert x["distance_to_teacher_final"] == pytest.approx(y["distance_to_teacher_final"], abs=1e-4)
        assert x["diversity"] == pytest.approx(y["diversity"], abs=1e-4)


def test_prompt_teacher_rows_default_to_digit_captions():
    rows = make_rows(load_teacher("digits-sd"), [0, 1])
    assert len(rows.names) == 3 and len(rows.conds.prompts) == 6 and rows.names[0] == "a handwritten digit zero"


@pytest.mark.parametrize("args", [["no-such-model"], ["digits-unet", "--steps", "0"], ["digits-unet", "--labels", "12"],
                                  ["digits-unet", "--seeds", "1", "1"], ["digits-unet", "--teacher", "digits-flow"],
                                  ["digits-unet", "--hybrid-teacher-steps", "1"]])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args):
    try:
        code = main(["inspect", *args, "--out", str(tmp_path / "g.png")])
    except SystemExit as e:  # argparse's type checks (--steps 0): its one-line usage error
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "error: " in err and "\n" not in err
