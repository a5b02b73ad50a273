"""Reliability under faults: the NaN guard per phase, checkpoint faults, run folders as data, the run lock."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from stepdistill.config import load_config
from stepdistill.contract import StepdistillError
from stepdistill.objectives.base import LossOut
from stepdistill.training.checkpoint import latest_checkpoint
from stepdistill.training.trainer import NonFiniteError, Trainer

FAST = ["train.log_every=1", "train.sample_every=0", "train.batch_size=16", "train.num_sample_images=4",
        "student.fit_steps=20", "student.mlp_hidden=16", "fake_score.mlp_hidden=16"]


def toy(*extra):
    return load_config("toy2d/dmd", FAST + list(extra))


# ------------------------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("bad", ["student", "fake_score"])
def test_one_phase_nan_every_round_stops_the_run(tmp_path, bad):
    """The other phase succeeds every round; the single shared counter used to be reset by it and never fire."""
    tr = Trainer(toy("train.steps=40", "train.max_nonfinite=5", "train.checkpoint_every=0"), tmp_path / "r", progress=False)
    real = tr.objective.loss

    def loss(phase, nets, batch, rng):
        out = real(phase, nets, batch, rng)
        return LossOut(out.loss * float("nan"), out.logs) if phase == bad else out

    tr.objective.loss = loss
    with pytest.raises(NonFiniteError, match=rf"^stopping: 5 non-finite updates in a row .*phase '{bad}'") as e:
        tr.run()
    assert "\n" not in str(e.value)
    assert tr.nonfinite_total[bad] == 5 and tr.step < 40
    other = "fake_score" if bad == "student" else "student"
    assert tr.updates[other] >= 2, "the healthy phase kept updating in between"


def test_nan_hyperparameter_is_a_config_error():
    with pytest.raises(StepdistillError, match=r"^objective.guidance_scale = nan is not a finite number$"):
        toy("objective.guidance_scale=nan")


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("override, key", [
    ("train.steps=-5", "train.steps"), ("train.steps=0", "train.steps"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.log_every=0", "train.log_every"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"), ("train.sample_every=-1", "train.sample_every"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"), ("student.grad_clip=-1", "student.grad_clip"),
    ("student.ema_decay=2", "student.ema_decay"), ("student.ema_decay=1", "student.ema_decay"),
    ("student.lr=-1e-4", "student.lr"), ("fake_score.lr=0", "fake_score.lr"), ("student.betas=[0.9, 1.0]", "student.betas"),
    ("discriminator.betas=[-0.1, 0.9]", "discriminator.betas"), ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"), ("student.mlp_hidden=0", "student.mlp_hidden"),
    ("fake_score.fit_steps=-3", "fake_score.fit_steps"), ("objective.t_min=nan", "objective.t_min"),
    ("objective.regression_weight=.nan", "objective.regression_weight"), ("student.lr=inf", "student.lr"),
    ("student.times=[1.0, .inf]", "student.times"), ("train.steps=1e999", "train.steps"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(StepdistillError) as e:
        toy(override)
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 5\n  steps: 50\n")
    with pytest.raises(StepdistillError, match=r"duplicate key 'steps'"):
        load_config(str(path))
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(StepdistillError, match="cannot read recipe"):
        load_config(str(path))


def test_fp16_on_cpu_is_an_error_not_silent_fp32(tmp_path):
    with pytest.raises(StepdistillError, match="fp16 needs a CUDA device"):
        Trainer(toy("train.mixed_precision=fp16", "train.cpu=true"), tmp_path / "r", progress=False)


def test_validation_module_has_no_import_circle():
    code = "import stepdistill.objectives.score.dmd, stepdistill.validation as v; import sys; print('stepdistill.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]


# ------------------------------------------------------------------------------- checkpoints


class Killed(BaseException):
    """A simulated SIGKILL: no except/finally in the code under test handles it."""


def _finished(tmp_path):
    cfg = toy("train.steps=2", "train.checkpoint_every=2", "student.ema_decay=0.5")
    tr = Trainer(cfg, tmp_path / "base", progress=False)
    tr.run()  # the final save re-saves step 2: the same-step path every recipe ends with
    return cfg, tr


@pytest.mark.parametrize("target", ["os.replace", "shutil.rmtree", "os.unlink"])
def test_kill_at_every_point_of_a_same_step_resave_leaves_a_resumable_run(tmp_path, monkeypatch, target):
    cfg, tr = _finished(tmp_path)
    module, name = target.split(".")
    mod = {"os": os, "shutil": shutil}[module]
    real = getattr(mod, name)
    k, hit_all = 0, False
    while not hit_all:
        k += 1
        run = tmp_path / f"{name}_{k}"
        shutil.copytree(tmp_path / "base", run)
        tr.run_dir = run
        calls = {"n": 0}

        def faulty(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                raise Killed
            return real(*a, **kw)

        monkeypatch.setattr(mod, name, faulty)
        try:
            tr.save()
            hit_all = True  # the save finished before the k-th call: every point has been tried
        except Killed:
            pass
        finally:
            monkeypatch.setattr(mod, name, real)
        resumed = Trainer(cfg, run, resume=True, progress=False)
        assert resumed.step == 2, (target, k)
        assert all(torch.equal(p, q) for p, q in zip(resumed.ema.shadow_params, tr.ema.shadow_params))
        resumed.save()  # the next save cleans what the kill left
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert left == ["latest", "step_0000002"], (target, k, left)
        resumed.release()
    assert k > 1, f"{target} was never called during a re-save"


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "extra.safetensors", "trainer_state.json"])
def test_truncated_newest_checkpoint_resumes_from_the_previous(tmp_path, capsys, damaged):
    cfg = toy("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    Trainer(cfg, tmp_path / "r", progress=False).run()
    newest = tmp_path / "r" / "checkpoints" / "step_0000004"
    data = (newest / damaged).read_bytes()
    (newest / damaged).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    resumed = Trainer(cfg, tmp_path / "r", resume=True, progress=False)
    assert resumed.step == 2
    out = capsys.readouterr().out
    assert f"{damaged} is damaged" in out and "step_0000002" in out
    resumed.release()
    assert latest_checkpoint(tmp_path / "r").name == "step_0000002"  # eval/export pick the same one


def test_latest_must_name_a_folder_inside_the_run_and_stale_temps_are_cleaned(tmp_path):
    cfg = toy("train.steps=2", "train.checkpoint_every=0")
    tr = Trainer(cfg, tmp_path / "r", progress=False)
    tr.run()
    ckpts = tmp_path / "r" / "checkpoints"
    shutil.copytree(ckpts / "step_0000002", tmp_path / "elsewhere")
    for bad in ("../../elsewhere", str(tmp_path / "elsewhere")):
        (ckpts / "latest").write_text(bad)
        with pytest.raises(StepdistillError, match="must name a step_NNNNNNN folder inside"):
            latest_checkpoint(tmp_path / "r")
    (ckpts / "latest").write_text("step_0000002")
    (ckpts / ".tmp_step_0000009").mkdir()
    (ckpts / ".tmp_step_0000009" / "model.safetensors").write_bytes(b"half")
    tr.save()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]


# ------------------------------------------------------------------------ run folders are data


def test_tampered_run_folder_executes_nothing(tmp_path, monkeypatch):
    from stepdistill.cli import main
    from stepdistill.training.run import load_student

    cfg = toy("train.steps=1", "train.checkpoint_every=0")
    run = tmp_path / "downloaded"
    Trainer(cfg, run, progress=False).run()
    sentinel = tmp_path / "pwned"
    (run / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\nclass Evil: pass\n")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["objective"] = {"name": "downloaded.evil.Evil"}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as with `python -m stepdistill.cli` run from the parent folder
    with pytest.raises(StepdistillError, match="not a registered objective"):
        load_student(run)
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    with pytest.raises(StepdistillError, match="objective"):
        Trainer(cfg, run, resume=True, progress=False)
    assert not sentinel.exists() and "downloaded.evil" not in sys.modules
    # the same dotted path given on the command line is the user's choice
    assert load_config(None, ["objective.name=nan_objective.NaNObjective"]).objective.__class__.__name__ == "NaNObjective"


def test_second_writer_of_a_run_folder_is_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(run / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StepdistillError, match=r"is in use by another training process") as e:
            Trainer(toy("train.steps=1"), run, progress=False)
        assert "\n" not in str(e.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    tr = Trainer(toy("train.steps=1", "train.checkpoint_every=0"), run, progress=False)  # free again
    with pytest.raises(StepdistillError, match="in use by another training process"):
        Trainer(toy("train.steps=1"), run, progress=False)  # a second writer in the same process too
    tr.run()
    assert json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"] == 1


# -------------------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_train_section_and_fewer_steps(tmp_path):
    cfg = toy("train.steps=2", "train.checkpoint_every=0")
    Trainer(cfg, tmp_path / "r", progress=False).run()
    with pytest.raises(StepdistillError, match=r"^resume with the run's own config: train.batch_size differ"):
        Trainer(toy("train.steps=2", "train.checkpoint_every=0", "train.batch_size=8"), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(StepdistillError, match=r"train.steps=1 is below the run's 2"):
        Trainer(toy("train.steps=1", "train.checkpoint_every=0"), tmp_path / "r", resume=True, progress=False)
    grown = Trainer(toy("train.steps=3", "train.checkpoint_every=0"), tmp_path / "r", resume=True, progress=False)
    assert grown.step == 2 and grown.run()["steps"] == 3


def test_resume_accepts_a_run_written_before_newer_keys_existed(tmp_path):
    """A key added by a later stepdistill is absent from an older run's config.yaml: at its default it
    changes nothing, so the resume goes on; set to anything else it is a difference as before."""
    import yaml

    Trainer(toy("train.steps=1", "train.checkpoint_every=0"), tmp_path / "r", progress=False).run()
    path = tmp_path / "r" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["student"]["feature_weight"], saved["student"]["compress"]  # as written before those keys existed
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(StepdistillError, match=r"^resume with the run's own config: student.feature_weight differ"):
        Trainer(toy("train.steps=2", "train.checkpoint_every=0", "student.feature_weight=1"), tmp_path / "r", resume=True,
                progress=False)
    # logging, sample-grid and checkpoint intervals are bookkeeping: a resume may change them
    grown = Trainer(toy("train.steps=2", "train.checkpoint_every=0", "train.log_every=7", "train.keep_checkpoints=0"),
                    tmp_path / "r", resume=True, progress=False)
    assert grown.step == 1 and grown.run()["steps"] == 2
