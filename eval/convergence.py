"""Convergence curves: a student's FID and recall against wall-clock minutes of training (issue 17).

Trains one recipe with a checkpoint every ``--every`` rounds (all kept), then evaluates every
checkpoint's student, EMA and raw, on the benchmark's protocol (digits features, seeds 0..N-1,
balanced classes) beside the teacher's own ``--teacher-steps`` line, and writes

* ``eval/results/convergence/<name>.json``: per checkpoint the round, the training minutes (from
  the run's ``metrics.jsonl``), FID / recall / accuracy of EMA and raw; the teacher's record; and
  the targets of issue 17 checked against them: the first minute at or below 1.1x the teacher's FID,
  the best FID, and the drift (the largest rise above the best between the 4-minute point and 3x
  its rounds);
* ``eval/results/convergence/<name>.png``: the curves, the teacher's line and the 1.1x line.

    OMP_NUM_THREADS=1 python eval/convergence.py digits-unet/sid --rounds 600 --every 25
    OMP_NUM_THREADS=1 python eval/convergence.py digits-unet/sid --name digits-vunet-sid teacher.name=digits-vunet
    python eval/convergence.py --plot-only eval/results/convergence/digits-unet-sid.json
    python eval/convergence.py --plot-only B.json --continues A.json   # B's run resumed A's into a new folder

Wall-clock minutes depend on the machine and its load: run it on an idle machine (the JSON records
the thread count and the load average at the start and the end); the FIDs do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "eval" / "results" / "convergence"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def train(recipe: str, overrides: list[str], run_dir: Path, rounds: int, every: int) -> None:
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    cfg = load_config(recipe, list(overrides) + [f"train.steps={rounds}", f"train.checkpoint_every={every}",
                                                f"train.log_every={every}", "train.sample_every=0",
                                                f"train.keep_checkpoints={rounds // every + 1}"])
    resume = (run_dir / "checkpoints").is_dir()
    Trainer(cfg, run_dir, resume=resume, progress=True).run()


def minutes_by_round(run_dir: Path) -> dict[int, float]:
    """Round -> training minutes so far (resumed segments summed: ``rundir.seconds_by_round``)."""
    from stepdistill.training.rundir import seconds_by_round

    return {step: round(sec / 60, 3) for step, sec in seconds_by_round(run_dir).items()}


def evaluate(run_dir: Path, teacher_spec: str, teacher_steps: int, teacher_guidance, num_samples: int) -> dict:
    from stepdistill.evaluation.cli import samplers_for
    from stepdistill.evaluation.harness import EvalSettings, Evaluator
    from stepdistill.evaluation.sources import student_sampler
    from stepdistill.training.checkpoint import checkpoint_dirs

    evaluator = Evaluator(EvalSettings(num_samples=num_samples, batch_size=100, cost=False), "cpu", log=lambda _m: None)
    teacher = next(iter(samplers_for(teacher_spec, [teacher_steps], guidance_scale=teacher_guidance)))
    trec = evaluator.evaluate(teacher)
    print(f"teacher {teacher.label}: FID {trec['fid']:.3f} R {trec['recall']:.3f}", flush=True)
    minutes = minutes_by_round(run_dir)
    points = []
    for ckpt in checkpoint_dirs(run_dir):
        row = {"checkpoint": ckpt.name}
        for kind, ema in (("ema", True), ("raw", False)):
            sampler = student_sampler(run_dir, use_ema=ema, checkpoint=ckpt)
            if kind == "ema" and not sampler.info.get("ema"):
                continue  # no EMA in this run
            rec = evaluator.evaluate(sampler)
            row["round"] = int(sampler.info["step"])
            row[kind] = {k: rec.get(k) for k in ("fid", "recall", "precision", "accuracy", "fid_layers", "recall_layers")}
        row["minutes"] = minutes.get(row["round"])
        points.append(row)
        print(f"round {row['round']:5d} ({row['minutes']} min): " + "  ".join(
            f"{k} FID {row[k]['fid']:.3f} R {row[k]['recall']:.3f}" for k in ("ema", "raw") if k in row), flush=True)
    teacher_rec = {k: trec.get(k) for k in ("model", "solver", "steps", "guidance_scale", "fid", "recall", "precision", "accuracy")}
    return {"teacher": teacher_rec, "points": points, "protocol": evaluator.protocol() | {"num_samples": num_samples}}


def targets(points: list[dict], teacher_fid: float, budget_min: float = 4.0, ratio: float = 1.1) -> dict:
    """Issue 17's targets on one curve (EMA when present): first minute <= ratio x teacher, best, drift."""
    out = {}
    for kind in ("ema", "raw"):
        pts = [(p["round"], p["minutes"], p[kind]["fid"]) for p in points if kind in p and p["minutes"] is not None]
        if not pts:
            continue
        hit = next(((r, m) for r, m, f in pts if f <= ratio * teacher_fid), None)
        best = min(pts, key=lambda x: x[2])
        at_budget = [x for x in pts if x[1] <= budget_min]
        anchor = at_budget[-1] if at_budget else pts[0]
        window = [x for x in pts if anchor[0] <= x[0] <= 3 * anchor[0]]
        best_in = min(x[2] for x in window)
        worst_after = max((x[2] for x in window if x[0] >= min(w[0] for w in window if w[2] == best_in)), default=best_in)
        out[kind] = {
            "first_round_at_target": hit[0] if hit else None, "first_minutes_at_target": hit[1] if hit else None,
            "target": f"FID <= {ratio} x teacher {teacher_fid:.3f} = {ratio * teacher_fid:.3f} within {budget_min} min",
            "met_within_budget": bool(hit and hit[1] <= budget_min),
            "best_fid": best[2], "best_round": best[0], "best_ratio": round(best[2] / teacher_fid, 3),
            "fid_at_budget": anchor[2], "round_at_budget": anchor[0], "ratio_at_budget": round(anchor[2] / teacher_fid, 3),
            "drift_window_rounds": [anchor[0], 3 * anchor[0]], "covered_to_round": window[-1][0],
            "drift": round(worst_after / best_in - 1, 4), "no_drift": worst_after <= 1.1 * best_in,
        }
    return out


def join(result: dict, earlier_json: Path) -> None:
    """Put an earlier curve's points (rounds before this run's first) in front of ``result``'s and
    take the targets over the joined curve; the teacher records must match."""
    earlier = json.loads(Path(earlier_json).read_text())
    if earlier["teacher"]["fid"] != result["teacher"]["fid"]:
        raise SystemExit(f"--continues {earlier_json}: its teacher FID {earlier['teacher']['fid']:.4f} is not this "
                         f"curve's {result['teacher']['fid']:.4f} (another teacher, guidance or sample count)")
    first = min(p["round"] for p in result["points"])
    result["points"] = [p for p in earlier["points"] if p["round"] < first] + [p for p in result["points"]]
    result["continues"] = os.path.relpath(Path(earlier_json).resolve(), ROOT)
    result["targets"] = targets(result["points"], result["teacher"]["fid"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    teacher = result["teacher"]
    for kind, style in (("ema", "-o"), ("raw", "--s")):
        pts = [p for p in result["points"] if kind in p and p["minutes"] is not None]
        if pts:
            ax.plot([p["minutes"] for p in pts], [p[kind]["fid"] for p in pts], style, ms=3, label=f"student ({kind})")
            bx.plot([p["minutes"] for p in pts], [p[kind]["recall"] for p in pts], style, ms=3, label=f"student ({kind})")
    label = f"teacher {teacher['solver']} {teacher['steps']} steps, w={teacher['guidance_scale']}"
    ax.axhline(teacher["fid"], color="k", lw=1, label=label)
    ax.axhline(1.1 * teacher["fid"], color="k", lw=1, ls=":", label="1.1x teacher")
    ax.axvline(4.0, color="grey", lw=0.8, ls="-.")
    bx.axhline(teacher["recall"], color="k", lw=1, label=label)
    ax.set(xlabel="training minutes", ylabel="FID (digits features)", yscale="log", title=result["name"])
    bx.set(xlabel="training minutes", ylabel="recall", title=f"{result['machine']['threads']} thread(s)")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", help="shipped recipe name or YAML path")
    ap.add_argument("overrides", nargs="*", help="section.key=value (e.g. teacher.name=digits-vunet)")
    ap.add_argument("--name", help="result name (default: the recipe with / as -, plus the teacher when overridden)")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--every", type=int, default=25, help="rounds between evaluated checkpoints")
    ap.add_argument("--num-samples", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--teacher-guidance", type=float, default=None, help="default: the teacher's recommended scale")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, help="default: runs/convergence/<name> (resumed when it exists)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate an existing run's checkpoints")
    ap.add_argument("--plot-only", type=Path, metavar="JSON")
    ap.add_argument("--continues", type=Path, metavar="JSON",
                    help="an earlier curve this run continues (resumed into a new folder): its points before this run's "
                         "first checkpoint come first, and the targets are taken over the joined curve")
    args = ap.parse_args(argv)
    if args.plot_only:
        result = json.loads(args.plot_only.read_text())
        if args.continues:
            join(result, args.continues)
            args.plot_only.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.plot_only.with_suffix(".png"))
        return 0
    if not args.recipe:
        ap.error("a recipe is required")
    import torch

    from stepdistill.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    name = args.name or args.recipe.replace("/", "-").removesuffix(".yaml")
    run_dir = args.run_dir or ROOT / "runs" / "convergence" / name
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_at_start": _load()}
    start = time.time()
    if not args.eval_only:
        train(args.recipe, args.overrides, run_dir, args.rounds, args.every)
    machine["load_after_training"] = _load()
    result = {"name": name, "recipe": args.recipe, "overrides": args.overrides, "teacher_name": cfg.teacher.name,
              "run_dir": os.path.relpath(run_dir, ROOT), "rounds": args.rounds, "every": args.every,
              "command": "python eval/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    result |= evaluate(run_dir, cfg.teacher.name, args.teacher_steps, args.teacher_guidance, args.num_samples)
    machine["load_at_end"] = _load()
    result["machine"] = machine
    result["wall_seconds"] = round(time.time() - start, 1)
    result["targets"] = targets(result["points"], result["teacher"]["fid"])
    if args.continues:
        join(result, args.continues)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
