"""Bad input gets a clear one-line error and exit code 2; commands have help with an example."""

import json

import pytest

from stepdistill.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *argv) -> str:
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_unknown_config_key_suggests_nearest(capsys):
    assert "did you mean 'guidance_scale'" in one_line_error(capsys, "train", "toy2d/dmd", "objective.guidanc_scale=2")
    assert "did you mean 'train'" in one_line_error(capsys, "train", "toy2d/dmd", "trian.steps=2")
    assert "cannot read 'abc' as int" in one_line_error(capsys, "train", "toy2d/dmd", "train.steps=abc")


def test_unknown_recipe_and_objective(capsys):
    assert "no recipe 'toy2d/dmdd'" in one_line_error(capsys, "train", "toy2d/dmdd")
    assert "did you mean 'dmd'" in one_line_error(capsys, "train", "toy2d/dmd", "objective.name=dmdd")


def test_missing_or_wrong_teacher_folder(capsys, tmp_path):
    msg = one_line_error(capsys, "train", "toy2d/dmd", f"teacher.name={tmp_path / 'nope'}", "student.init=copy", "fake_score.init=copy")
    assert "does not exist" in msg
    (tmp_path / "empty").mkdir()
    msg = one_line_error(capsys, "train", "toy2d/dmd", f"teacher.name={tmp_path / 'empty'}", "student.init=copy", "fake_score.init=copy")
    assert "not a diffusers teacher folder" in msg


def test_unsupported_prediction_type(capsys, unet_teacher_dir):
    meta = json.loads((unet_teacher_dir / "stepdistill_teacher.json").read_text())
    (unet_teacher_dir / "stepdistill_teacher.json").write_text(json.dumps(meta | {"prediction_type": "score"}))
    msg = one_line_error(capsys, "train", "toy2d/dmd", f"teacher.name={unet_teacher_dir}", "student.init=copy", "fake_score.init=copy")
    assert "unsupported prediction type 'score'" in msg


def test_mismatched_resolution_or_channels(capsys, tmp_path):
    from diffusers import DDPMScheduler
    from PIL import Image

    from conftest import tiny_unet2d

    teacher = tmp_path / "rgb-teacher"
    tiny_unet2d(channels=3).save_pretrained(teacher / "unet")
    DDPMScheduler().save_pretrained(teacher / "scheduler")
    args = ["train", "toy2d/dmd", f"teacher.name={teacher}", "student.init=copy", "fake_score.init=copy",
            "train.steps=1", "train.batch_size=2", "--no-progress"]
    msg = one_line_error(capsys, *args, "data.real=digits", f"--output-dir={tmp_path / 'a'}")
    assert "shape (1, 8, 8), but the teacher makes (3, 8, 8)" in msg
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (20, 20)).save(folder / "a.png")  # an image folder is resized and converted to the teacher's shape
    rc, _, err = run(capsys, *args, f"data.real={folder}", f"--output-dir={tmp_path / 'b'}")
    assert rc == 0, err
    assert "needs an analytic teacher" in one_line_error(capsys, *args, "data.real=teacher", f"--output-dir={tmp_path / 'c'}")


def test_analytic_teacher_cannot_be_copied(capsys):
    assert "no weights to copy" in one_line_error(capsys, "train", "toy2d/dmd", "student.init=copy")


def test_nan_in_training_is_one_line(capsys, tmp_path):
    msg = one_line_error(capsys, "train", "toy2d/dmd", "objective.name=nan_objective.NaNObjective", "train.max_nonfinite=2",
                         "train.steps=5", "student.fit_steps=10", f"--output-dir={tmp_path / 'n'}", "--no-progress")
    assert "non-finite updates in a row" in msg


def test_listing_commands_and_help(capsys):
    rc, out, _ = run(capsys, "recipes")
    assert rc == 0 and "toy2d/dmd" in out.split()
    rc, out, _ = run(capsys, "teachers")
    assert rc == 0 and "analytic:ring8" in out
    for cmd in ("train", "recipes", "teachers", "quickstart"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "example: stepdistill" in capsys.readouterr().out
