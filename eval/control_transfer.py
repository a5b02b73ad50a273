"""Control transfer (issue 16, item 4): does a LoRA trained on the teacher act the same on its student?

1. Train a remap LoRA (default 3 -> 8: captions of 3 paired with images of 8) on the digits-sd
   teacher with ``stepdistill.control.train_control_lora``.
2. Export a trained digits-sd student run (``--run``; or take an exported folder, ``--export``).
3. Sample the teacher (DDIM, ``--teacher-steps``, its recommended CFG 3) and the student (its own
   step count, no CFG) for the source prompt without and with the LoRA, the same seeds, and
   classify the samples with the digits classifier: the fraction drawn as the target digit and as
   the source digit. For the other digits' prompts it also reports the accuracy without and with
   the LoRA (is the adapter specific?).
4. ``--reverse``: train the same LoRA on the exported student and measure it on both.

    python eval/control_transfer.py --run runs/digits-sd-dmd2

Writes eval/results/control_transfer.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a trained digits-sd student run directory (exported to a temporary folder)")
    src.add_argument("--export", help="an exported digits-sd student folder")
    p.add_argument("--remap", default="3:8", help="SOURCE:TARGET (default 3:8)")
    p.add_argument("--lora-steps", type=int, default=300, help="LoRA optimizer steps (default 300)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=128, help="samples for the source prompt (default 128)")
    p.add_argument("--other-samples", type=int, default=24, help="samples per other digit (default 24; 0: skip)")
    p.add_argument("--teacher-steps", type=int, default=10, help="DDIM steps for the teacher (default 10)")
    p.add_argument("--reverse", action="store_true", help="also train the LoRA on the student and measure it on both")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "eval" / "results" / "control_transfer.json"))
    return p.parse_args(argv)


def other_digits_accuracy(pipe, lora, remap, n, steps, guidance, seed=10_000) -> dict:
    """Accuracy over the prompts of the digits the LoRA does not remap, without and with it."""
    import torch

    from stepdistill.control import classify_samples, load_control_lora

    digits = [d for d in range(10) if d not in remap]

    def accuracy():
        hits = [(classify_samples(pipe, d, n, steps, guidance, seed) == d).float().mean().item() for d in digits]
        return {"mean": float(torch.tensor(hits).mean()), "per_digit": dict(zip(map(str, digits), hits))}

    without = accuracy()
    load_control_lora(pipe, lora)
    try:
        with_lora = accuracy()
    finally:
        pipe.unload_lora_weights()
    return {"digits": digits, "samples_per_digit": n, "without": without, "with": with_lora}


def measure(name, folder, lora, remap, args, steps=None) -> dict:
    from stepdistill.control import load_sd_pipeline, measure_control, sampling_defaults

    pipe = load_sd_pipeline(folder)
    start = time.time()
    row = measure_control(folder, lora, remap, steps, args.num_samples, pipe=pipe)
    if args.other_samples:
        steps, guidance = sampling_defaults(pipe, Path(folder), row["steps"], row["guidance_scale"])
        row["other_digits"] = other_digits_accuracy(pipe, lora, remap, args.other_samples, steps, guidance)
    row |= {"model": name, "seconds": round(time.time() - start, 1)}
    return row


def train_lora(source, out, remap, args) -> dict:
    from stepdistill.control import train_control_lora

    return train_control_lora(source, out, remap=remap, steps=args.lora_steps, rank=args.lora_rank, lr=args.lora_lr,
                              log_every=50)


def export_student(args, tmp: Path) -> tuple[Path, dict]:
    if args.export:
        return Path(args.export), {}
    from stepdistill.export import export_run

    meta = export_run(args.run, tmp / "student")
    return tmp / "student", {"run": args.run, "objective": meta["objective"], "rounds": meta["rounds"], "ema": meta["ema"],
                             "steps": meta["steps"], "training": meta.get("training")}


def table(rows) -> str:
    lines = ["| LoRA trained on | sampled | steps | remap | target without | target with | source without | source with | "
             "other digits acc. without | with |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for pair, w in r["without"].items():
            x = r["with"][pair]
            o = r.get("other_digits") or {}
            acc = [f"{o[k]['mean']:.3f}" if o else "-" for k in ("without", "with")]
            lines.append(f"| {r['lora_source']} | {r['model']} | {r['steps']} | {pair} | {w['target_fraction']:.3f} | "
                         f"{x['target_fraction']:.3f} | {w['source_fraction']:.3f} | {x['source_fraction']:.3f} | {acc[0]} | {acc[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from stepdistill.control import parse_remap

    remap = parse_remap(args.remap)
    start, rows, loras = time.time(), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, student_info = export_student(args, tmp)
        loras["teacher"] = train_lora("digits-sd", tmp / "lora-teacher", remap, args)
        if args.reverse:
            loras["student"] = train_lora(student, tmp / "lora-student", remap, args)
        for source, meta in loras.items():
            lora = Path(meta["lora_file"]).parent
            for name, folder in (("teacher digits-sd", "digits-sd"), ("student", student)):
                steps = args.teacher_steps if folder == "digits-sd" else None
                rows.append(measure(name, folder, lora, remap, args, steps) | {"lora_source": source})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    for meta in loras.values():
        meta.pop("lora_file", None)
    record = {"command": "python eval/control_transfer.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "student": student_info or {"export": args.export}, "loras": loras, "rows": rows,
              "seconds": round(time.time() - start, 1), "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "versions": {m: __import__(m).__version__ for m in ("torch", "diffusers", "peft")}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
