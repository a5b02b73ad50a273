"""Two CPU processes under torchrun (gloo): the path multi-GPU runs take, on a laptop."""

import json
import os
import subprocess
import sys
from pathlib import Path

from stepdistill.config import load_config
from stepdistill.training.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_lora_run_stays_in_sync_and_resumes_in_one(tmp_path, unet_teacher_dir):
    run = tmp_path / "ddp"
    overrides = [f"teacher.name={unet_teacher_dir}", "student.init=lora", "fake_score.init=lora",
                 "student.lora_rank=2", "fake_score.lora_rank=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(WORKER.parent), str(WORKER.parent.parent)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(WORKER), str(run), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["type"] == "DistributedType.MULTI_CPU"
    assert r0["labels"] != r1["labels"], "each rank must draw its own conditions"
    assert r0["sums"] == r1["sums"], "trained weights must stay identical across ranks"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_0000004/random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    cfg = load_config("toy2d/dmd", ["train.steps=5", "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1",
                                    "train.batch_size=4"] + overrides)
    resumed = Trainer(cfg, run, resume=True, progress=False)  # written by two processes, resumed by one
    assert resumed.step == 4
    sums = {n: [float(p.double().sum()) for p in t.params] for n, t in resumed.trainables.items()}
    assert sums == r0["sums"]
    resumed.run()
    assert resumed.step == 5


def test_a_signal_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    """Rank 1 alone gets SIGTERM in round 2: the stop flag is all-reduced each round, so both ranks save and stop."""
    run = tmp_path / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(WORKER.parent), str(WORKER.parent.parent)]),
               STEPDISTILL_TEST_SIGNAL_RANK="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(WORKER), str(run), "student.fit_steps=20", "student.mlp_hidden=16", "fake_score.mlp_hidden=16", "train.steps=50",
           "train.checkpoint_every=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((run / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r1["stopped"].startswith("stopped by SIGTERM at round 2; checkpoint written")
    assert r0["stopped"].startswith("stopped by a stop signal on another rank at round 2")
    assert r0["step"] == r1["step"] == 2 and r0["sums"] == r1["sums"]
    ckpt = run / "checkpoints" / "step_0000002"
    assert (ckpt / "COMPLETE").is_file() and sorted(p.name for p in ckpt.glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
