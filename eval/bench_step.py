"""The trainer's own overhead per training round, per objective, on digits-unet.

For each objective's shipped ``digits-unet/<objective>`` recipe it times, in one process and
interleaved round by round (so both see the same machine load):

* **trainer**: one round through ``Trainer.update`` for every phase (batch sampling, gradient
  isolation, accelerate's autocast and backward, the non-finite checks, gradient clipping,
  optimizer and LR-scheduler steps, EMA, logging values);
* **bare**: the same phases as plain PyTorch on the same networks: a batch from the same sampler,
  ``requires_grad`` set for the phase's networks, ``objective.loss``, ``loss.backward()``, the
  raw optimizer's ``step`` and ``zero_grad``, nothing else.

The overhead is median(trainer) / median(bare) - 1; the target (issue 8) is under 10%.

    python eval/bench_step.py [--objectives dmd dmd2 ...] [--rounds 10] [--threads 1]

Writes eval/results/bench_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["dmd", "dmd2", "vsd", "sid", "lcm", "scm", "ladd"]
TARGET = 0.10


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def trainer_round(tr) -> None:
    for phase, count in tr.objective.phases.items():
        for _ in range(count):
            tr.update(phase)


def bare_round(tr) -> None:
    for phase, count in tr.objective.phases.items():
        names = tuple(tr.objective.phase_updates(phase))
        for _ in range(count):
            for name, t in tr.trainables.items():
                for p in t.params:
                    p.requires_grad_(name in names)
            batch = tr.sampler.next()
            out = tr.objective.loss(phase, tr.nets, batch, tr.rng)
            out.loss.backward()
            for name in names:
                opt = _raw(tr.trainables[name].optimizer)
                opt.step()
                opt.zero_grad(set_to_none=True)


def measure(objective: str, rounds: int, warmup: int, batch_size: int | None) -> dict:
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    over = ["train.sample_every=0", "train.checkpoint_every=0", "train.log_every=100000", "train.steps=100000", "train.cpu=true"]
    if batch_size:
        over.append(f"train.batch_size={batch_size}")
    cfg = load_config(f"digits-unet/{objective}", over)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", progress=False)
        for _ in range(warmup):
            trainer_round(tr)
            bare_round(tr)
        t_trainer, t_bare = [], []
        for i in range(rounds):  # alternate which goes first, so neither always follows the other
            for fn, acc in ((trainer_round, t_trainer), (bare_round, t_bare))[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                fn(tr)
                acc.append(time.perf_counter() - start)
    trainer_s, bare_s = statistics.median(t_trainer), statistics.median(t_bare)
    return {"objective": objective, "updates_per_round": sum(cfg.objective.phases.values()) if hasattr(cfg.objective, "phases") else None,
            "batch_size": cfg.train.batch_size, "trainer_s": trainer_s, "bare_s": bare_s, "overhead": trainer_s / bare_s - 1,
            "rounds": rounds, "trainer_all_s": t_trainer, "bare_all_s": t_bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of each kind (interleaved)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(ROOT / "eval" / "results" / "bench_step.json"), help="'-' for none")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'objective':<9} {'upd/round':>9} {'trainer ms':>11} {'bare ms':>9} {'overhead':>9}", flush=True)
    for objective in args.objectives:
        r = measure(objective, args.rounds, args.warmup, args.batch_size)
        rows.append(r)
        flag = "" if r["overhead"] < TARGET else f"  (target < {TARGET:.0%} not met)"
        print(f"{objective:<9} {r['updates_per_round']:>9} {r['trainer_s'] * 1e3:>11.1f} {r['bare_s'] * 1e3:>9.1f} "
              f"{r['overhead']:>9.1%}{flag}", flush=True)
    record = {"teacher": "digits-unet", "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "target_overhead": TARGET, "command": " ".join(["python", "eval/bench_step.py"] + sys.argv[1:]), "rows": rows}
    if args.output != "-":
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
