"""``stepdistill quickstart``: distil, export, reload, evaluate and report, on the embedded digits teacher.

1. **train** a one-step SiD student of ``digits-unet`` (recipe ``digits-unet/sid``: 600 rounds of
   1 fake-score + 1 student update, batch 32; the best one-step FID of the objectives on this
   teacher in ``eval/RESULTS.md``; ``--fast``: 6 small rounds, for CI);
2. **export** it with ``stepdistill export`` into a folder ``DiffusionPipeline.from_pretrained``
   loads (the class-conditional pipeline travels inside it);
3. **reload** that folder in a fresh Python process that never imports stepdistill, sample with
   fixed seeds, and check the images equal the toolkit's own student samples;
4. **evaluate** on one protocol (``stepdistill eval``): the teacher at 50 DPM-Solver++ steps and at
   1 step, and the exported student at 1 step: FID and precision/recall in the digits
   classifier's features against all 1797 digits, conditional accuracy, NFE, latency;
5. **report**: ``report.md`` with the grids side by side, the table and the speed-up, and
   ``summary.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import load_config
from .contract import StepdistillError

RECIPE = "digits-unet/sid"
OBJECTIVE = "SiD"
TEACHER = "digits-unet"
FULL = {"overrides": [], "eval_samples": 500}
FAST = {"overrides": ["train.steps=6", "train.batch_size=8", "train.sample_every=0", "train.checkpoint_every=0"],
        "eval_samples": 60}
STUDENT = f"student, {OBJECTIVE} 1 step (exported pipeline)"

_RELOAD = """
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
labels = list(range(10)) * 2
images = pipe(class_labels=labels, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
assert "stepdistill" not in sys.modules
save_file({"images": images.contiguous()}, sys.argv[2])
print(type(pipe).__name__, tuple(images.shape))
"""


def _stage(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _toolkit_images(run_dir: Path, labels: list[int]) -> torch.Tensor:
    """The trained student's own images for ``labels`` with one generator seeded 0 (as the pipeline)."""
    from .sampling import few_step_sample
    from .training.run import load_student

    student = load_student(run_dir, use_ema=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(labels), *student.teacher.sample_shape, generator=g)
    with torch.no_grad():
        x = few_step_sample(student.view, noise, {"class_labels": torch.tensor(labels)}, student.times, g)
    return (x / 2 + 0.5).clamp(0, 1)


def _reload_in_clean_process(export_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    target = out / "reload_check.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(export_dir.resolve()), str(target.resolve())],
                          capture_output=True, text=True,
                          env=env, cwd=out, timeout=600)
    if proc.returncode != 0:
        raise StepdistillError(f"reloading {export_dir} in a clean process failed: {proc.stderr.strip().splitlines()[-1]}")
    return {"images": load_file(str(target))["images"], "stdout": proc.stdout.strip()}


def quickstart(out: Path, fast: bool = False, progress: bool = True) -> dict:
    """Run the five stages; returns the summary written to ``out/summary.json``."""
    from .evaluation.cli import evaluate_models
    from .evaluation.harness import EvalSettings
    from .export import export_run
    from .training.trainer import Trainer

    out = Path(out).resolve()  # the clean-process reload runs elsewhere; relative paths would point nowhere
    if out.exists() and any(out.iterdir()):
        raise StepdistillError(f"{out} already holds files; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    plan = FAST if fast else FULL
    times: dict[str, float] = {}

    _stage(f"1/5 training a one-step {OBJECTIVE} student of {TEACHER} (recipe {RECIPE}{', --fast' if fast else ''})")
    cfg = load_config(RECIPE, plan["overrides"])
    start = time.time()
    trainer = Trainer(cfg, out / "run", progress=progress)
    trainer.run()
    times["train_s"] = round(time.time() - start, 1)
    del trainer

    _stage("2/5 exporting to a diffusers pipeline folder")
    start = time.time()
    export_run(out / "run", out / "pipeline")
    times["export_s"] = round(time.time() - start, 1)

    _stage("3/5 reloading it with DiffusionPipeline.from_pretrained in a clean process")
    reload = _reload_in_clean_process(out / "pipeline", out)
    ours = _toolkit_images(out / "run", list(range(10)) * 2)
    parity = float((reload["images"] - ours).abs().max())
    if parity > 1e-4:
        raise StepdistillError(f"the reloaded pipeline differs from the trained student by {parity:.3g} (max abs)")

    _stage(f"4/5 evaluating teacher (50 and 1 DPM-Solver++ steps) and student (1 step) on {plan['eval_samples']} samples")
    settings = EvalSettings(num_samples=plan["eval_samples"], batch_size=100, cost_batch_size=32, cost_repeats=3)
    start = time.time()
    w = float(cfg.objective.guidance_scale)  # the teacher at the guidance its student was distilled toward (its best FID here)
    teacher_rows = evaluate_models([TEACHER], out / "eval" / "teacher", settings, [50, 1], solvers=["dpm++"], guidance_scale=w,
                                   log=_stage)
    student_rows = evaluate_models([str(out / "pipeline")], out / "eval" / "student", settings, [1], trust_remote_code=True,
                                   log=_stage)
    times["eval_s"] = round(time.time() - start, 1)

    _stage("5/5 writing the report")
    rows = {f"teacher, DPM-Solver++ 50 steps, w={w:g}": teacher_rows[0], f"teacher, DPM-Solver++ 1 step, w={w:g}": teacher_rows[1],
            STUDENT: student_rows[0]}
    summary = {"teacher": TEACHER, "recipe": RECIPE, "fast": fast, "rounds": cfg.train.steps, "batch_size": cfg.train.batch_size,
               "seconds": times, "eval_samples": plan["eval_samples"], "reload_parity_max_abs": parity,
               "reload": reload["stdout"], "results": {k: _row(v) for k, v in rows.items()},
               "guidance_scale": w, "speedup_vs_teacher_50": _speedup(teacher_rows[0], rows[STUDENT]),
               "paths": {"run": str(out / "run"), "pipeline": str(out / "pipeline"), "eval": str(out / "eval"),
                         "report": str(out / "report.md")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(_report(summary, rows, out))
    _stage(f"done: report {out / 'report.md'}, pipeline {out / 'pipeline'}, run {out / 'run'}")
    return summary


def _row(r: dict) -> dict:
    keys = ("fid", "kid", "precision", "recall", "accuracy", "vendi", "nfe", "latency_s", "throughput_img_s")
    return {k: r.get(k) for k in keys} | {"grid": r.get("sample_grid")}


def _speedup(teacher: dict, student: dict) -> float | None:
    a, b = teacher.get("latency_s"), student.get("latency_s")
    return round(a / b, 1) if a and b else None


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _report(s: dict, rows: dict, out: Path) -> str:
    lines = ["# stepdistill quickstart", "",
             f"A one-step {OBJECTIVE} student of the embedded `{s['teacher']}` teacher (recipe `{s['recipe']}`, {s['rounds']} rounds of "
             f"batch {s['batch_size']}{', --fast' if s['fast'] else ''}; distilled toward the teacher at guidance w={s['guidance_scale']:g}, "
             "the teacher's rows use the same w), exported to a diffusers pipeline, reloaded with "
             "`DiffusionPipeline.from_pretrained` in a fresh process (max abs difference to the trained student: "
             f"{s['reload_parity_max_abs']:.2g}) and evaluated against its teacher on one protocol: {s['eval_samples']} samples "
             "(seeds 0..N-1, balanced labels), FID and precision/recall in the digits classifier's features against all 1797 "
             "scikit-learn digits, conditional accuracy by the same classifier, latency per image at batch 32 on this machine.",
             "", "| model | NFE | FID | precision | recall | accuracy | latency ms/img |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lat = r.get("latency_s")
        lines.append(f"| {name} | {_fmt(r.get('nfe'), '.0f')} | {_fmt(r.get('fid'))} | {_fmt(r.get('precision'))} | "
                     f"{_fmt(r.get('recall'))} | {_fmt(r.get('accuracy'))} | {_fmt(lat * 1000 if lat else None, '.1f')} |")
    lines += ["", f"Speed-up of the student over the teacher at 50 steps: {s['speedup_vs_teacher_50'] or '-'}x (latency).",
              f"Time: training {s['seconds']['train_s']} s, export {s['seconds']['export_s']} s, evaluation "
              f"{s['seconds']['eval_s']} s.", "", "| teacher, 50 steps | teacher, 1 step | student, 1 step |", "|---|---|---|"]
    grids = [os.path.relpath(r["sample_grid"], out) if r.get("sample_grid") else "" for r in rows.values()]
    lines.append("| " + " | ".join(f"![{n}]({g})" for n, g in zip(("teacher 50", "teacher 1", "student 1"), grids)) + " |")
    lines += ["", "Load the student yourself:", "", "```python", "import torch", "from diffusers import DiffusionPipeline", "",
              f"pipe = DiffusionPipeline.from_pretrained(\"{out / 'pipeline'}\", trust_remote_code=True)",
              "images = pipe(class_labels=list(range(10)), num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images",
              "```", ""]
    return "\n".join(lines)
