"""Run by tests/test_distributed.py under torchrun: train a few rounds, report per-rank state."""

import json
import sys

import torch

from stepdistill.config import load_config
from stepdistill.training.trainer import Trainer

torch.set_num_threads(1)
out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config("toy2d/dmd", ["train.steps=4", "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1",
                                "train.batch_size=4"] + overrides)
tr = Trainer(cfg, out, progress=False)
first = tr.sampler.next()  # conditions drawn by this rank (seeds differ per rank)
tr.run()
rank = tr.accelerator.process_index
report = {"rank": rank, "world": tr.accelerator.num_processes, "type": str(tr.accelerator.distributed_type),
          "labels": first.cond["class_labels"].tolist(),
          "sums": {n: [float(p.double().sum()) for p in t.params] for n, t in tr.trainables.items()}}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(report, f)
