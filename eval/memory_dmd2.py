"""Peak memory of one DMD2 training round: LoRA student + LoRA fake score vs full copies.

One round = ``critic_ratio`` fake-score (+ GAN head) updates and one student update of the
shipped recipe ``<teacher>/dmd2`` (GAN on when the recipe has real data), on the same teacher.
Each configuration runs in its own subprocess so the peaks do not mix:

* CUDA: ``torch.cuda.max_memory_allocated`` (reset after the teacher is loaded; the teacher's
  own weights are reported separately as ``teacher_bytes``).
* CPU: peak resident set size (``resource.getrusage``) minus the resident size measured after
  imports and the teacher load, i.e. networks + optimizer states + activations of the round.

    python eval/memory_dmd2.py [--teacher digits-unet] [--batch-size 4 32] [--device cpu|cuda]

Prints a table and writes eval/results/memory_dmd2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "lora": ["student.init=lora", "fake_score.init=lora"],
    "copy": ["student.init=copy", "fake_score.init=copy"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(config: str, teacher: str, batch_size: int, device: str) -> dict:
    """Build the run, do one round, return the measurements (runs inside the subprocess)."""
    import torch

    torch.set_num_threads(1)
    from stepdistill.config import load_config
    from stepdistill.teachers import load_teacher
    from stepdistill.training.trainer import Trainer

    load_teacher(teacher)  # warm the imports and file caches the way the trainer will
    over = CONFIGS[config] + [f"train.batch_size={batch_size}", "train.steps=1", "train.sample_every=0",
                              "train.checkpoint_every=0", "train.log_every=1"] + (["train.cpu=true"] if device == "cpu" else [])
    cfg = load_config(f"{teacher}/dmd2", over)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", progress=False)
        teacher_bytes = sum(p.numel() * p.element_size() for n, p in tr.teacher.denoiser.named_parameters() if "lora_" not in n)
        for phase, count in tr.objective.phases.items():
            for _ in range(count):
                tr.update(phase)
        trained = {n: sum(p.numel() for p in t.params) for n, t in tr.trainables.items()}
    out = {"config": config, "batch_size": batch_size, "device": device, "trained_params": trained, "teacher_bytes": teacher_bytes,
           "critic_ratio": cfg.objective.critic_ratio, "gan": bool(cfg.objective.gan_weight > 0)}
    if device == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["method"] = "torch.cuda.max_memory_allocated (teacher weights loaded before the reset are excluded)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        out["peak_bytes"] = int(peak - base_rss)
        out["peak_rss_bytes"] = int(peak)
        out["method"] = "peak RSS (getrusage) minus RSS after imports + teacher load"
    return out


def run_all(teacher: str, batch_sizes: list[int], device: str) -> list[dict]:
    rows = []
    for batch_size, config in ((b, c) for b in batch_sizes for c in CONFIGS):
        cmd = [sys.executable, __file__, "--worker", config, "--teacher", teacher, "--batch-size", str(batch_size), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"{'batch':>5} {'config':<6} {'trained params':>15} {'peak MiB':>9} {'LoRA/copy':>9}  (student / fake_score / gan_head)"]
    for r in rows:
        tp = r["trained_params"]
        parts = " / ".join(f"{tp.get(n, 0):,}" for n in ("student", "fake_score", "gan_head"))
        full = next(q for q in rows if q["config"] == "copy" and q["batch_size"] == r["batch_size"])["peak_bytes"]
        lines.append(f"{r['batch_size']:>5} {r['config']:<6} {sum(tp.values()):>15,} {r['peak_bytes'] / mib:>9.1f} "
                     f"{r['peak_bytes'] / full:>9.2f}  ({parts})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="digits-unet")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "memory_dmd2.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.teacher, args.batch_size[0], args.device)))
        return
    rows = run_all(args.teacher, args.batch_size, args.device)
    print(table(rows))
    import torch

    record = {"teacher": args.teacher, "batch_sizes": args.batch_size, "device": args.device, "torch": torch.__version__,
              "machine": platform.machine(), "command": " ".join(["python"] + sys.argv), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
