"""Training time of the toy2d recipes (CPU seconds, one torch thread) against a one-minute budget.

The convergence tests (tests/test_*convergence.py) assert behaviour only: every mode covered,
the distance to the teacher improved. How long that takes is measured here, on an idle machine:

    OMP_NUM_THREADS=1 python eval/bench_toy.py            # writes eval/results/bench_toy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from stepdistill.training.convergence import ring_convergence

RECIPES = ["toy2d/dmd", "toy2d/dmd2", "toy2d/vsd", "toy2d/sid", "toy2d/lcm", "toy2d/scm"]
BUDGET_S = 60.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_toy.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            before, after, shares, near, cpu = ring_convergence(recipe, Path(tmp) / "run")
        rows.append({"recipe": recipe, "cpu_seconds": round(cpu, 1), "budget_s": BUDGET_S, "within_budget": cpu < BUDGET_S,
                     "sw_before": round(before, 4), "sw_after": round(after, 4), "min_mode_share": round(float(shares.min()), 4),
                     "near_mode": round(near, 4)})
        print(f"{recipe:12s} CPU {cpu:6.1f}s (budget {BUDGET_S:.0f}s) SW {before:.3f} -> {after:.3f} "
              f"min share {float(shares.min()):.3f}", flush=True)
    record = {"machine": platform.processor() or platform.machine(), "torch_threads": 1, "rows": rows}
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
