"""The trainer: gradient isolation, checkpoints, exact resume, the NaN guard."""

import json

import pytest
import torch

from stepdistill.training.checkpoint import latest_checkpoint
from stepdistill.config import load_config
from stepdistill.contract import StepdistillError
from stepdistill.training.trainer import NonFiniteError, Trainer

FAST = ["train.log_every=1", "train.sample_every=0", "train.batch_size=32", "train.num_sample_images=16",
        "student.fit_steps=50", "student.mlp_hidden=32", "fake_score.mlp_hidden=32"]


def toy(tmp_path, *extra, name="run"):
    cfg = load_config("toy2d/dmd", FAST + list(extra))
    return cfg, tmp_path / name


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.mark.parametrize("init", ["copy", "lora"])
def test_gradient_isolation_per_phase(tmp_path, unet_teacher_dir, init):
    cfg = load_config("toy2d/dmd", FAST + [f"teacher.name={unet_teacher_dir}", f"student.init={init}",
                                           f"fake_score.init={init}", "train.steps=1", "student.lora_rank=2",
                                           "fake_score.lora_rank=2", "train.batch_size=4", "objective.guidance_scale=2"])
    tr = Trainer(cfg, tmp_path / "iso", progress=False)
    teacher_params = [p for n, p in tr.teacher.denoiser.named_parameters() if "lora_" not in n]
    t0 = snapshot(teacher_params)
    student, fake = tr.trainables["student"].params, tr.trainables["fake_score"].params
    s0, f0 = snapshot(student), snapshot(fake)
    tr.update("student")
    assert changed(s0, student), "the student phase must update the student"
    assert not changed(f0, fake), "critic parameters must not change in the student phase"
    assert all(p.grad is None for p in fake)
    s1 = snapshot(student)
    tr.update("fake_score")
    assert changed(f0, fake) and not changed(s1, student)
    assert not changed(t0, teacher_params) and all(p.grad is None and not p.requires_grad for p in teacher_params)


def test_checkpoints_metrics_samples_and_exact_resume(tmp_path):
    steps = ["train.checkpoint_every=3", "train.keep_checkpoints=2"]
    cfg_a, dir_a = toy(tmp_path, "train.steps=6", *steps, "student.ema_decay=0.9", name="a")
    summary = Trainer(cfg_a, dir_a, progress=False).run()
    assert summary["steps"] == 6 and (dir_a / "config.yaml").is_file()
    lines = [json.loads(line) for line in (dir_a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and "student/dm_grad_norm" in lines[-1]
    assert (dir_a / "samples" / "step_0000006.png").is_file()
    assert latest_checkpoint(dir_a).name == "step_0000006"
    assert sorted(p.name for p in (dir_a / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000006"]

    dir_b = tmp_path / "b"
    Trainer(cfg_a, dir_b, progress=False).run(until=3)  # interrupted after round 3
    with pytest.raises(StepdistillError, match="already holds a run"):
        Trainer(cfg_a, dir_b, progress=False)
    cfg_b6 = cfg_a
    resumed = Trainer(cfg_b6, dir_b, resume=True, progress=False)
    assert resumed.step == 3
    resumed.run()
    full = Trainer(cfg_a, dir_a, resume=True, progress=False)
    for name in ("student", "fake_score"):
        for p, q in zip(full.trainables[name].params, resumed.trainables[name].params):
            assert torch.equal(p, q), f"{name} weights differ after resume"
    assert all(torch.equal(p, q) for p, q in zip(full.ema.shadow_params, resumed.ema.shadow_params))


def test_resume_refuses_other_config(tmp_path):
    cfg, run = toy(tmp_path, "train.steps=2")
    Trainer(cfg, run, progress=False).run()
    other, _ = toy(tmp_path, "train.steps=4", "objective.guidance_scale=1.5")
    with pytest.raises(StepdistillError, match="objective.guidance_scale differ"):
        Trainer(other, run, resume=True, progress=False)
    with pytest.raises(StepdistillError, match="nothing to resume"):
        Trainer(cfg, tmp_path / "empty", resume=True, progress=False)


def test_nan_guard_skips_counts_and_stops_without_overwriting(tmp_path):
    cfg = load_config(None, FAST + ["student.init=fit", "objective.name=nan_objective.NaNObjective", "objective.after=2",
                                    "train.steps=50", "train.max_nonfinite=3", "train.checkpoint_every=2"])
    run = tmp_path / "nan"
    tr = Trainer(cfg, run, progress=False)
    with pytest.raises(NonFiniteError, match=r"3 non-finite updates in a row .*phase 'student'.*network student"):
        tr.run()
    last = latest_checkpoint(run)
    assert last.name == "step_0000002"  # written before the NaNs; never overwritten after
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2 and tr.nonfinite_total["student"] == 3
    assert all(torch.isfinite(p).all() for p in tr.trainables["student"].params)


def test_interrupted_save_never_corrupts_latest(tmp_path):
    cfg, run = toy(tmp_path, "train.steps=2")
    tr = Trainer(cfg, run, progress=False)
    tr.run()
    (run / "checkpoints" / ".tmp_step_0000004").mkdir()  # a save killed half-way
    assert latest_checkpoint(run).name == "step_0000002"
    (run / "checkpoints" / "latest").write_text("step_0000009")  # pointer to nothing: fall back
    assert latest_checkpoint(run).name == "step_0000002"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_writes_checkpoint_then_stops(tmp_path, sig):
    cfg = load_config(None, FAST + ["student.init=fit", "objective.name=nan_objective.SignalObjective", "objective.at=3",
                                    f"objective.signal_name={sig}", "train.steps=100", "train.checkpoint_every=0"])
    with pytest.raises(StepdistillError, match=f"stopped by {sig} at round 3; checkpoint written"):
        Trainer(cfg, tmp_path / "sig", progress=False).run()
    assert latest_checkpoint(tmp_path / "sig").name == "step_0000003"
    assert Trainer(cfg, tmp_path / "sig", resume=True, progress=False).step == 3


def test_objective_extra_network_is_trained_isolated_and_resumed(tmp_path):
    cfg = load_config(None, FAST + ["student.init=fit", "objective.name=nan_objective.HeadObjective", "train.steps=4",
                                    "train.checkpoint_every=2", "discriminator.lr=1e-2"])
    tr = Trainer(cfg, tmp_path / "iso", progress=False)
    head, student = tr.trainables["head"].params, tr.trainables["student"].params
    assert tr.nets.extra["head"] is tr.trainables["head"].module
    h0, s0 = snapshot(head), snapshot(student)
    tr.update("head")
    assert changed(h0, head) and not changed(s0, student), "the head phase must update the head only"
    h1 = snapshot(head)
    tr.update("student")
    assert changed(s0, student) and not changed(h1, head)
    assert tr.trainables["head"].optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    Trainer(cfg, tmp_path / "h", progress=False).run()
    Trainer(cfg, tmp_path / "h2", progress=False).run(until=2)
    resumed = Trainer(cfg, tmp_path / "h2", resume=True, progress=False)
    resumed.run()
    assert all(torch.equal(p, q) for p, q in zip(Trainer(cfg, tmp_path / "h", resume=True, progress=False).trainables["head"].params,
                                                 resumed.trainables["head"].params))


def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(tmp_path, unet_teacher_dir):
    from safetensors import safe_open

    over = FAST + [f"teacher.name={unet_teacher_dir}", "student.init=lora", "fake_score.init=lora", "student.lora_rank=2",
                   "fake_score.lora_rank=2", "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2"]
    cfg = load_config("toy2d/dmd", over)
    Trainer(cfg, tmp_path / "a", progress=False).run()
    ckpt = latest_checkpoint(tmp_path / "a")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), "a LoRA checkpoint must not carry the frozen base"
    assert any(".student." in k for k in keys) and any(".fake_score." in k for k in keys)
    Trainer(cfg, tmp_path / "b", progress=False).run(until=2)
    resumed = Trainer(cfg, tmp_path / "b", resume=True, progress=False)
    resumed.run()
    full = Trainer(cfg, tmp_path / "a", resume=True, progress=False)
    for name in ("student", "fake_score"):
        assert all(torch.equal(p, q) for p, q in zip(full.trainables[name].params, resumed.trainables[name].params))
    base = [p for n, p in full.teacher.denoiser.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)
    # a checkpoint from another layout (full copies) is refused in one line, not half-loaded
    other = load_config("toy2d/dmd", over[:-3] + ["student.init=copy", "fake_score.init=copy", "train.steps=4"])
    Trainer(other, tmp_path / "c", progress=False).run(until=1)
    import shutil

    from stepdistill.training.checkpoint import _write_marker

    target = latest_checkpoint(tmp_path / "c")
    shutil.copy(ckpt / "model.safetensors", target / "model.safetensors")
    _write_marker(target)  # a complete checkpoint, of another layout (a plain copy is caught as damage)
    with pytest.raises(StepdistillError, match="does not match the run's networks"):
        Trainer(other, tmp_path / "c", resume=True, progress=False)


def test_sigkill_then_resume_gives_the_same_losses_step_for_step(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    over = FAST + ["student.init=fit", "objective.name=nan_objective.EnvKillObjective", "train.steps=10",
                   "train.checkpoint_every=3", "student.lr=1e-2"]

    def cli(run, kill_at=None):
        env = dict(os.environ, OMP_NUM_THREADS="1",  # this checkout first, not the installed one
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent)]))
        env.pop("STEPDISTILL_TEST_KILL_AT", None)
        if kill_at:
            env["STEPDISTILL_TEST_KILL_AT"] = str(kill_at)
        return subprocess.run([sys.executable, "-m", "stepdistill.cli", "train", "toy2d/dmd", "--output-dir", str(run),
                               "--no-progress", *over], env=env, capture_output=True, text=True, timeout=300)

    def losses(run):
        by_step = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():  # a re-run round overwrites its first record
            rec = json.loads(line)
            by_step[rec["step"]] = rec["student/loss"]
        return by_step

    full = cli(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = cli(tmp_path / "killed", kill_at=8)  # dies in round 8, after the round-6 checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000006"
    resumed = Trainer(load_config("toy2d/dmd", over), tmp_path / "killed", resume=True, progress=False)
    assert resumed.step == 6 and resumed.run()["steps"] == 10
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[k] == b[k] for k in a), {k: (a[k], b[k]) for k in a if a[k] != b[k]}
