"""Hostile input at every boundary: each CLI flag fuzzed, and a table of filesystem, teacher-folder,
run-folder and checkpoint faults run for real. Every case ends in a one-line error (exit 2) or a
valid run; never a traceback, never a silent wrong run (issue 18).

The flag fuzz stops each command where its work would begin (training, sampling): what it checks
is that no flag value gets that far unchecked. The work itself, and what it does with bad data, is
what the table below runs end to end.
"""

from __future__ import annotations

import argparse
import errno
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stepdistill.cli import build_parser, main

FAST = ["train.log_every=1", "train.sample_every=0", "train.batch_size=16", "train.num_sample_images=4",
        "student.fit_steps=20", "student.mlp_hidden=16", "fake_score.mlp_hidden=16"]


def one_line_error(err: str) -> bool:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return "Traceback" not in err and len(lines) >= 1 and "error" in lines[-1].lower()


def run_cli(argv, capsys):
    """main(argv) -> (exit code, stderr); argparse's own exits count as exit codes."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------ flag fuzz


class Reached(Exception):
    """Raised where a command's work would start: its arguments passed every check."""


def _subcommands(parser=None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command, nested ones as "control train": name -> its parser."""
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            out = {}
            for name, sub in action.choices.items():
                out |= _subcommands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub}
            return out
    if parser is None:
        raise AssertionError("no subcommands")
    return {}


SUB = _subcommands()
HOSTILE = ["nan", "inf", "-inf", "-1", "0", "1", "2", "4", "4294967296", "1e309", "1.5", "banana", "", " ", "--", "-",
           "cuda:99", "cpu", "x" * 300, "/nonexistent/x", "\x00", "é", "[1, 2]", "True"]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Positional values: hostile paths, plus real but cheap ones."""
    root = tmp_path_factory.mktemp("places")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    garbage = root / "garbage_run"
    (garbage / "checkpoints").mkdir(parents=True)
    (garbage / "config.yaml").write_bytes(b"\x00\xff: [unclosed\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    return [str(root / "a_file"), str(root / "empty"), str(garbage), str(root / "binary.yaml"), str(root / "missing"),
            "digits-unet", "toy2d/dmd", "toy2d/nonexistent", "x" * 300, ""]


def _valid(action) -> list[str]:
    """Plausible good tokens for an option, so that the fuzz also gets past parsing."""
    from stepdistill import validation as v

    kind = action.type
    if kind in (v.positive_int, v.nonneg_int, v.seed_int, int):
        return ["1", "2", "4"]
    if kind in (v.finite_float, float):
        return ["1.0", "2.5"]
    if kind is v.device_name or action.dest == "device":
        return ["cpu"]
    return ["out_x", "o.png", "digits-unet"]


def _value(action, draw) -> list[str]:
    if action.nargs == 0:
        return []
    count = draw(st.integers(1, 2)) if action.nargs in ("+", "*") else 1
    good = sorted(action.choices) if action.choices else _valid(action)
    bad = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=6))
    return [draw(st.sampled_from(good)) if draw(st.booleans()) else draw(bad) for _ in range(count)]


@st.composite
def command_lines(draw, places):
    name = draw(st.sampled_from(sorted(SUB)))
    parser = SUB[name]
    argv = name.split()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == "debug":  # --debug asks for tracebacks
            continue
        if not action.option_strings:  # positional
            n = 2 if action.nargs == "+" and draw(st.booleans()) else 1
            if action.nargs == "*":
                argv += [draw(st.sampled_from(["train.steps=-5", "objective.guidance_scale=nan", "train.seed=-1",
                                               "nonsense.key=1", "student.lr=0", "train.steps=2"]))
                         for _ in range(draw(st.integers(0, 2)))]
            else:
                cheap = ["toy2d/dmd"] if name in ("train", "plan") else ["digits-sd"] if name.startswith("control") else ["digits-unet"]
                argv += [draw(st.sampled_from(cheap) if draw(st.booleans()) else st.sampled_from(places)) for _ in range(n)]
        elif action.required or draw(st.integers(0, 3)) == 0:
            argv += [draw(st.sampled_from(action.option_strings)), *_value(action, draw)]
    if draw(st.integers(0, 4)) == 0:
        argv.append(draw(st.sampled_from(HOSTILE)))  # a stray token
    return argv


def _checked(**values):
    """What reaches the work must be in range: the argparse types and config checks hold."""
    for key, v in values.items():
        if isinstance(v, float):
            assert math.isfinite(v), (key, v)
        if isinstance(v, int) and not isinstance(v, bool) and key != "seed":
            assert v >= 0, (key, v)
        if isinstance(v, (list, tuple)):
            for x in v:
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    assert math.isfinite(x) and x >= 0, (key, v)
    raise Reached


@pytest.fixture
def stop_at_work(monkeypatch):
    import stepdistill.control as control
    import stepdistill.evaluation.cli as ecli
    import stepdistill.export as export
    import stepdistill.inspection as inspection
    import stepdistill.quickstart as quickstart
    import stepdistill.training.trainer as trainer

    def train(cfg, out, resume=False, progress=True):
        _checked(steps=cfg.train.steps, batch=cfg.train.batch_size, seed=cfg.train.seed)

    def evaluate_models(models, out, s, steps, solvers, guidance_scale, device, *a, **kw):
        s.check()
        torch.device(device)
        _checked(steps=steps, guidance=guidance_scale, n=s.num_samples, batch=s.batch_size, seed=s.seed)

    def inspect_model(model, out, teacher, steps, seeds, labels, prompts, guidance_scale, student_steps, device, *a):
        torch.device(device)
        _checked(steps=steps, seeds=seeds, labels=labels or [], guidance=guidance_scale, student_steps=student_steps)

    def export_run(run_dir, out_dir, steps, **kw):
        _checked(steps=steps or [])

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(ecli, "evaluate_models", evaluate_models)
    monkeypatch.setattr(inspection, "inspect_model", inspect_model)
    monkeypatch.setattr(export, "export_run", export_run)
    monkeypatch.setattr(quickstart, "quickstart", lambda out, fast=False, progress=True: _checked())

    def load_sd_pipeline(name_or_folder, device="cpu"):  # control train / measure: their work starts here
        torch.device(device)
        _checked()

    monkeypatch.setattr(control, "load_sd_pipeline", load_sd_pipeline)


@settings(max_examples=int(__import__("os").environ.get("FAULT_EXAMPLES", 150)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_cli_flag_answers_with_one_line_or_reaches_the_work_in_range(places, stop_at_work, capsys, data, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (runs/...) land in the test's folder
    argv = data.draw(command_lines(places))
    try:
        code, err = run_cli(argv, capsys)
    except Reached:
        event(f"{' '.join(argv[:2]) if argv[0] == 'control' else argv[0]}: reached the work")
        return
    event(f"{' '.join(argv[:2]) if argv[0] == 'control' else argv[0]}: exit {code}")
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 1, 2), (argv, code, err)
    if code == 2:
        assert one_line_error(err) and len(err.strip().splitlines()) == 1, (argv, err)


def test_the_fuzz_reaches_every_command(places, stop_at_work, capsys, tmp_path, monkeypatch):
    """The stop points are real: valid command lines reach them (so the fuzz above is not all early errors)."""
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "toy2d/dmd", "train.steps=2"], ["quickstart", "--out", str(tmp_path / "q")],
                 ["eval", "digits-unet", "--out", str(tmp_path / "e"), "--num-samples", "8"],
                 ["inspect", "digits-unet", "--out", str(tmp_path / "i.png")],
                 ["control", "train", "digits-sd", "--output", str(tmp_path / "c"), "--steps", "2"]):
        with pytest.raises(Reached):
            run_cli(argv, capsys)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "digits-unet", "--out", "o", "--device", "banana"], "not a torch device"),
    (["eval", "digits-unet", "--out", "o", "--guidance-scale", "nan"], "finite"),
    (["eval", "digits-unet", "--out", "o", "--seed", "-1"], "seed"),
    (["eval", "digits-unet", "--out", "o", "--cost-batch-size", "0"], "--cost-batch-size"),
    (["inspect", "digits-unet", "--out", "o.png", "--device", "nope"], "not a torch device"),
    (["inspect", "digits-unet", "--out", "o.png", "--guidance-scale", "inf"], "finite"),
    (["plan", "toy2d/dmd", "--batch-size", "0"], "--batch-size"),
    (["export", "r", "o", "--steps", "0"], "--steps"),
    (["bogus"], "invalid choice"),
])
def test_named_bad_flags_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------- teacher folder faults


def _teacher_copy(tmp_path, name="t"):
    from stepdistill.resources import assets_dir

    dst = tmp_path / name
    shutil.copytree(assets_dir() / "teachers" / "digits-unet", dst)
    return dst


def _truncate(t):
    w = t / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:10000])


def _bin_only(t):
    (t / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (t / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _nan_weights(t):
    from safetensors.torch import load_file, save_file

    w = t / "unet" / "diffusion_pytorch_model.safetensors"
    d = load_file(str(w))
    d[sorted(d)[0]][...] = float("nan")
    save_file(d, str(w))


def _list_config(t):
    (t / "unet" / "config.json").write_text("[1, 2, 3]")


def _no_scheduler(t):
    shutil.rmtree(t / "scheduler")


def _garbage_config(t):
    (t / "unet" / "config.json").write_bytes(b"\xff\xfe{not json")


def _wrong_class(t):
    (t / "unet" / "config.json").write_text('{"_class_name": "os.system"}')


TEACHER_FAULTS = {"truncated weights": (_truncate, "truncated or corrupt"), ".bin only": (_bin_only, "safetensors"),
                  "NaN weights": (_nan_weights, "NaN or inf"), "list config.json": (_list_config, "config.json"),
                  "no scheduler": (_no_scheduler, "scheduler"), "garbage config.json": (_garbage_config, "config.json"),
                  "unknown model class": (_wrong_class, "not a diffusers model class")}


@pytest.mark.parametrize("fault", sorted(TEACHER_FAULTS))
def test_a_damaged_teacher_folder_is_one_line_in_eval_and_train(fault, tmp_path, capsys):
    make, needle = TEACHER_FAULTS[fault]
    t = _teacher_copy(tmp_path)
    make(t)
    code, err = run_cli(["eval", str(t), "--out", str(tmp_path / "o"), "--num-samples", "8", "--steps", "1", "--no-cost",
                         "--no-artifact-view"], capsys)
    assert code == 2 and one_line_error(err) and needle in err, err
    code, err = run_cli(["train", "digits-unet/dmd", f"teacher.name={t}", "train.steps=1", "--no-progress",
                         "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and one_line_error(err) and needle in err, err
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


def test_non_finite_samples_fail_the_evaluation():
    from stepdistill.contract import StepdistillError
    from stepdistill.evaluation.harness import generate_samples
    from stepdistill.evaluation.seeding import Conditions

    class NaNSampler:
        label = "broken"

        def generate(self, seeds, conds):
            x = torch.zeros(len(seeds), 1, 4, 4)
            x[-1, 0, 0, 0] = float("nan")
            return x

    with pytest.raises(StepdistillError, match="NaN or inf"):
        generate_samples(NaNSampler(), Conditions(labels=torch.zeros(4, dtype=torch.long)), 4, 0, 2)


# ---------------------------------------------------------------------------- run folder faults


def _toy_run(tmp_path, capsys, *extra):
    out = tmp_path / "run"
    code, err = run_cli(["train", "toy2d/dmd", *FAST, "train.steps=2", "train.checkpoint_every=1", *extra,
                         "--no-progress", "--output-dir", str(out)], capsys)
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", ["eval", "export", "resume", "inspect"])
@pytest.mark.parametrize("damage", ["garbage config.yaml", "binary config.yaml", "no config.yaml", "list config.yaml"])
def test_a_damaged_run_folder_is_one_line(command, damage, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    if damage == "garbage config.yaml":
        (run / "config.yaml").write_text("teacher: {name: [unclosed\n")
    elif damage == "binary config.yaml":
        (run / "config.yaml").write_bytes(bytes(range(256)))
    elif damage == "list config.yaml":
        (run / "config.yaml").write_text("- 1\n- 2\n")
    argv = {"eval": ["eval", str(run), "--out", str(tmp_path / "o"), "--num-samples", "8", "--no-cost"],
            "export": ["export", str(run), str(tmp_path / "x")],
            "resume": ["train", "toy2d/dmd", "--resume", "--output-dir", str(run), "--no-progress"],
            "inspect": ["inspect", str(run), "--out", str(tmp_path / "i.png")]}[command]
    code, err = run_cli(argv, capsys)
    assert code == 2 and one_line_error(err), err


@pytest.mark.parametrize("where", ["output dir is a file", "output path too long", "parent is a file"])
def test_a_bad_output_dir_is_one_line_and_writes_nothing(where, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    out = {"output dir is a file": tmp_path / "f", "output path too long": tmp_path / ("x" * 300),
           "parent is a file": tmp_path / "f" / "run"}[where]
    for argv in (["train", "toy2d/dmd", *FAST, "train.steps=1", "--no-progress", "--output-dir", str(out)],
                 ["quickstart", "--fast", "--no-progress", "--out", str(out)]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and one_line_error(err), (argv, err)
    assert (tmp_path / "f").read_text() == "x"


def test_a_read_only_output_dir_is_one_line(tmp_path, capsys, monkeypatch):
    """Simulated (the suite may run as root, which ignores permission bits): the folder cannot be created."""
    import pathlib

    real = pathlib.Path.mkdir
    target = tmp_path / "ro" / "run"

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code, err = run_cli(["train", "toy2d/dmd", *FAST, "train.steps=1", "--no-progress", "--output-dir", str(target)], capsys)
    assert code == 2 and one_line_error(err) and "Permission denied" in err, err


def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import stepdistill.training.checkpoint as ckpt

    run = _toy_run(tmp_path, capsys)  # complete: steps 1 and 2 saved
    real = ckpt.save_file

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    code, err = run_cli(["train", "toy2d/dmd", *FAST, "train.steps=4", "train.checkpoint_every=1", "--resume",
                         "--no-progress", "--output-dir", str(run)], capsys)
    assert code == 2 and one_line_error(err) and "No space left" in err, err
    assert ckpt.latest_checkpoint(run).name == "step_0000002"  # the failed save left the last complete one in place
    monkeypatch.setattr(ckpt, "save_file", real)
    code, err = run_cli(["train", "toy2d/dmd", *FAST, "train.steps=4", "train.checkpoint_every=1", "--resume",
                         "--no-progress", "--output-dir", str(run)], capsys)
    assert code == 0, err
    assert ckpt.latest_checkpoint(run).name == "step_0000004"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_binary_recipe_and_a_missing_recipe_are_one_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_bytes(bytes(range(256)))
    for recipe in (str(tmp_path / "r.yaml"), str(tmp_path / "missing.yaml"), "toy2d/nope", str(tmp_path)):
        for cmd in ("train", "plan"):
            code, err = run_cli([cmd, recipe, "--no-progress"] if cmd == "train" else [cmd, recipe], capsys)
            assert code == 2 and one_line_error(err), (cmd, recipe, err)
