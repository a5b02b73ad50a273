"""Run by tests/test_distributed.py under torchrun: train a few rounds, report per-rank state."""

import json
import os
import signal
import sys

import torch

from stepdistill.config import load_config
from stepdistill.contract import StepdistillError
from stepdistill.training.trainer import Trainer

torch.set_num_threads(1)
out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config("toy2d/dmd", ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1",
                                "train.batch_size=4"] + overrides)
tr = Trainer(cfg, out, progress=False)
first = tr.sampler.next()  # conditions drawn by this rank (seeds differ per rank)
rank = tr.accelerator.process_index
signal_rank = os.environ.get("STEPDISTILL_TEST_SIGNAL_RANK")  # this rank sends itself SIGTERM in round 2
if signal_rank is not None and int(signal_rank) == rank:
    real, calls = tr.objective.loss, [0]

    def loss(*a, **kw):
        calls[0] += 1
        if calls[0] == 2 * sum(tr.objective.phases.values()):  # the last update of round 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    tr.objective.loss = loss
stopped = None
try:
    tr.run()
except StepdistillError as e:
    stopped = str(e)
report = {"rank": rank, "stopped": stopped, "step": tr.step, "world": tr.accelerator.num_processes, "type": str(tr.accelerator.distributed_type),
          "labels": first.cond["class_labels"].tolist() if "class_labels" in first.cond else None,
          "sums": {n: [float(p.double().sum()) for p in t.params] for n, t in tr.trainables.items()}}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(report, f)
