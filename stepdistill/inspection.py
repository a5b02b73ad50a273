"""``stepdistill inspect MODEL``: the x0 prediction after every step, teacher beside student.

Diffusion Target visualisation (Gandikota & Bau, "Distilling Diversity and Control in Diffusion
Models", arXiv:2503.10637): for fixed seeds and conditions, the x0_hat each network predicts at
every step of its sampler, so one sees at which step a student leaves its teacher or collapses
modes.

* teacher: its own deterministic solver at N steps, exactly as ``stepdistill eval`` samples it
  (``evaluation.sources.solver_steps``: diffusers' DDIMScheduler, trailing spacing and the
  teacher's clipping, or flow Euler; CFG on the native output); x0_hat of every step is read from
  the scheduler's ``pred_original_sample``;
* student of a run directory (``training.run.load_student``): its few-step sampler at its own
  times, x0_hat after each step (``few_step_sample(stop_after=k)``, same per-sample noise);
* exported pipeline: the folder's own ``__call__``; x0_hat per step read from its scheduler's
  ``step`` (``LCMScheduler``: ``denoised``; ``FlowMatchEulerDiscreteScheduler``: x - sigma v).

Sample r (row r) uses the generator seeded with its own seed for its initial noise and any
re-noising, exactly as ``stepdistill eval`` does, so teacher and student rows start from the same
noise. Latents are decoded with ``teacher.decode``. Numbers (JSON beside the PNG), in decoded
image space in [-1, 1], as the RMS distance d(a, b) = sqrt(mean((a - b)^2)):

* ``diversity``: mean d over all seed pairs of one condition (mean over conditions);
* ``distance_to_teacher_final``: mean d between a step's x0_hat and the teacher's final sample
  of the same seed and condition.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .contract import StepdistillError
from .validation import device_name, finite_float, nonneg_int, positive_int, seed_int
from .evaluation.seeding import Conditions, per_sample_randn, sample_generators

EXAMPLE = "stepdistill inspect runs/a --steps 8 --seeds 0 1 2 3 --labels 0 3 7 --out inspect/a.png"


@dataclass
class Trajectory:
    """x0_hat after every step of one sampler, for every row."""

    name: str  # panel title, e.g. "teacher DDIM 8 steps, w=2"
    times: list[float]  # continuous time t of each step's network evaluation
    x0: list[Tensor]  # per step: [R, C, H, W] decoded images in [-1, 1]


@dataclass
class Rows:
    """Row r: condition ``names[r // len(seeds)]`` with seed ``seeds[r % len(seeds)]``."""

    seeds: list[int]  # the distinct seeds
    names: list[str]  # the distinct conditions, as text
    conds: Conditions  # per row

    @property
    def row_seeds(self) -> list[int]:
        return [s for _ in self.names for s in self.seeds]


# ------------------------------------------------------------------------------------ conditions


def make_rows(teacher, seeds: Sequence[int], labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> Rows:
    """Rows for a teacher's conditioning: class labels, prompts, or none (default: labels 0 1 2 / digit captions)."""
    from .conditioning import Prompts
    from .evaluation.sources import teacher_prompts

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StepdistillError(f"--seeds must be distinct integers, got {seeds}")
    n = len(seeds)
    if isinstance(teacher.conditioner, Prompts):
        if labels is not None:
            raise StepdistillError("this teacher is prompt-conditioned: give --prompts FILE, not --labels")
        if prompts is None and teacher_prompts(teacher) == "digits":
            from .training.data.digits import all_captions

            prompts = [all_captions(y)[0] for y in (0, 1, 2)]
        if not prompts:
            raise StepdistillError("this teacher is prompt-conditioned: give --prompts FILE (one prompt per line)")
        return Rows(seeds, list(prompts), Conditions(None, [p for p in prompts for _ in range(n)]))
    if prompts is not None:
        raise StepdistillError(f"teacher {teacher.name!r} takes no prompts" + (": use --labels" if teacher.num_classes else ""))
    if teacher.num_classes:
        labels = list(range(min(3, teacher.num_classes))) if labels is None else [int(y) for y in labels]
        bad = [y for y in labels if not 0 <= y < teacher.num_classes]
        if bad or not labels:
            raise StepdistillError(f"--labels must be class indices in [0, {teacher.num_classes}), got {labels}")
        return Rows(seeds, [f"class {y}" for y in labels], Conditions(torch.tensor([y for y in labels for _ in range(n)]), None))
    if labels is not None:
        raise StepdistillError(f"teacher {teacher.name!r} is unconditional: drop --labels")
    return Rows(seeds, ["unconditional"], Conditions())


def _decode(teacher, x: Tensor) -> Tensor:
    from .evaluation.sources import finish_samples

    return finish_samples(teacher, x.detach()).cpu()


# ------------------------------------------------------------------------------------ trajectories


@torch.no_grad()
def teacher_trajectory(teacher, rows: Rows, steps: int, guidance_scale: float | None = None, device="cpu",
                       denoiser=None) -> Trajectory:
    """x0_hat of every step of the teacher's own N-step solver (DDIM / flow Euler, as ``stepdistill eval``).

    ``denoiser``: what the steps call (default the teacher's; ``TeacherView`` for LoRA students).
    """
    from .evaluation.hybrid import TeacherView, teacher_solver
    from .evaluation.sources import cond_dicts, solver_steps

    if steps < 1:
        raise StepdistillError(f"--steps must be >= 1 teacher steps, got {steps}")
    sched = teacher_solver(teacher, steps)
    w = float(teacher.info.get("recommended_guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    cond, null = cond_dicts(teacher.conditioner, rows.conds, device)
    noise = per_sample_randn(sample_generators(rows.row_seeds), teacher.sample_shape).to(device)  # [R, *shape]
    view = denoiser or TeacherView(teacher.denoiser)
    with _StepRecorder(sched) as rec:
        solver_steps(view, sched, noise * getattr(sched, "init_noise_sigma", 1.0), cond, null, w)
    times = [float(view.schedule.from_native(ts.float())) for ts in sched.timesteps]
    guide = f", w={w:g}" if w != 1.0 else ""
    name = "flow Euler" if teacher.denoiser.schedule.kind == "flow" else "DDIM"
    return Trajectory(f"teacher {name} {steps} step{'s' * (steps != 1)}{guide}", times, [_decode(teacher, x) for x in rec.x0])


@torch.no_grad()
def student_trajectory(loaded, rows: Rows, device="cpu") -> Trajectory:
    """x0_hat after each step of a run's student (``LoadedStudent``), per-sample noise as ``stepdistill eval``."""
    from .evaluation.sources import cond_dicts
    from .sampling import few_step_sample

    teacher, times = loaded.teacher, list(loaded.times)
    cond, _ = cond_dicts(teacher.conditioner, rows.conds, device)
    x0 = []
    for k in range(len(times)):  # K <= 4: re-running the prefix costs K(K+1)/2 evaluations
        gens = sample_generators(rows.row_seeds)
        noise = per_sample_randn(gens, teacher.sample_shape).to(device)
        x0.append(_decode(teacher, few_step_sample(loaded.view, noise, cond, times, stop_after=k,
                                                   noise_fn=lambda shape: per_sample_randn(gens, shape[1:]))))
    return Trajectory(f"student {len(times)} step{'s' * (len(times) != 1)}", times, x0)


@torch.no_grad()
def hybrid_trajectory(loaded, rows: Rows, teacher_steps: int, schedule_steps: int, guidance_scale: float | None = None,
                      device="cpu") -> Trajectory:
    """x0_hat of the teacher's first k of N steps, then of each student step after the hand-over (``evaluation/hybrid.py``)."""
    from .evaluation.hybrid import TeacherView, check_hybrid, handover_time, hybrid_student_times, teacher_solver
    from .evaluation.sources import cond_dicts, solver_steps
    from .sampling import few_step_sample, init_noise_sigma

    check_hybrid(teacher_steps, schedule_steps)
    if teacher_steps == 0:
        raise StepdistillError("--hybrid-teacher-steps 0 is the student alone (already shown); use k >= 1")
    teacher = loaded.teacher
    w = float(teacher.info.get("recommended_guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    view = TeacherView(teacher.denoiser, lora=loaded.trainable.adapter is not None)
    cond, null = cond_dicts(teacher.conditioner, rows.conds, device)
    sched = teacher_solver(teacher, schedule_steps)
    noise = per_sample_randn(sample_generators(rows.row_seeds), teacher.sample_shape).to(device)  # [R, *shape]
    with _StepRecorder(sched) as rec:
        x_s = solver_steps(view, sched, noise * getattr(sched, "init_noise_sigma", 1.0), cond, null, w, count=teacher_steps)
    times = hybrid_student_times(loaded.times, handover_time(sched, view.schedule, teacher_steps))
    x0 = [_decode(teacher, x) for x in rec.x0]
    for j in range(len(times)):  # the student's re-noising continues each row's generator after its initial noise
        gens = sample_generators(rows.row_seeds)
        per_sample_randn(gens, teacher.sample_shape)
        x0.append(_decode(teacher, few_step_sample(loaded.view, x_s / init_noise_sigma(view.schedule), cond, times, stop_after=j,
                                                   noise_fn=lambda shape: per_sample_randn(gens, shape[1:]))))
    t_teacher = [float(view.schedule.from_native(ts.float())) for ts in sched.timesteps[:teacher_steps]]
    return Trajectory(f"hybrid: teacher {teacher_steps}/{schedule_steps} + student {len(times)}", t_teacher + list(times), x0)


class _StepRecorder:
    """Wraps a scheduler's ``step`` to keep each step's x0_hat (DDIM, LCM, flow Euler schedulers)."""

    def __init__(self, scheduler):
        self.scheduler, self.original, self.x0 = scheduler, scheduler.step, []
        name = type(scheduler).__name__
        if name not in ("DDIMScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler"):
            raise StepdistillError(f"inspect reads x0 from DDIMScheduler, LCMScheduler or FlowMatchEulerDiscreteScheduler, not {name}")

    def step(self, model_output, timestep, sample, *args, **kwargs):
        sched = self.scheduler
        if type(sched).__name__ == "FlowMatchEulerDiscreteScheduler":
            if sched.step_index is None:
                sched._init_step_index(timestep)
            self.x0.append(sample.float() - float(sched.sigmas[sched.step_index]) * model_output.float())  # x0 = x - sigma v
            return self.original(model_output, timestep, sample, *args, **kwargs)
        out = self.original(model_output, timestep, sample, *args, **kwargs)
        field = "denoised" if type(sched).__name__ == "LCMScheduler" else "pred_original_sample"  # DDIM
        self.x0.append(out[1] if isinstance(out, tuple) else getattr(out, field))
        return out

    def __enter__(self):
        self.scheduler.step = self.step
        return self

    def __exit__(self, *exc):
        self.scheduler.step = self.original
        return False


@torch.no_grad()
def pipeline_trajectory(folder, teacher, rows: Rows, steps: int | None = None, device="cpu",
                        trust_remote_code: bool = False) -> Trajectory:
    """x0_hat after each step of an exported pipeline's own call (one generator per row)."""
    import inspect as pyinspect

    from .evaluation.sources import load_pipeline, pipeline_call_kwargs

    meta_path = Path(folder) / "stepdistill_export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    exported = [int(n) for n in meta.get("steps", [])]
    steps = steps or (exported[0] if exported else 1)
    if exported and steps not in exported:
        raise StepdistillError(f"--student-steps {steps}: {folder} was exported for {exported} steps")
    pipe = load_pipeline(folder, device, trust_remote_code)
    params = pyinspect.signature(pipe.__call__).parameters
    with _StepRecorder(pipe.scheduler) as rec:
        pipe(**pipeline_call_kwargs(params, rows.row_seeds, rows.conds, steps, None))
    times = [float(t) for t in meta.get("student_times", {}).get(str(steps), [])] or [float("nan")] * len(rec.x0)
    return Trajectory(f"pipeline {steps} step{'s' * (steps != 1)}", times, [_decode(teacher, x) for x in rec.x0])


# ------------------------------------------------------------------------------------ numbers


def rms(a: Tensor, b: Tensor) -> Tensor:
    """Per-row RMS distance [R] of two image batches [R, C, H, W]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1).sqrt()


def diversity(x: Tensor, rows: Rows) -> list[float | None]:
    """Mean pairwise RMS distance across seeds, per condition (None for one seed)."""
    n, out = len(rows.seeds), []
    for c in range(len(rows.names)):
        block = x[c * n:(c + 1) * n]
        pairs = list(itertools.combinations(range(n), 2))
        out.append(float(torch.stack([rms(block[i:i + 1], block[j:j + 1])[0] for i, j in pairs]).mean()) if pairs else None)
    return out


def step_numbers(traj: Trajectory, rows: Rows, final: Tensor) -> list[dict]:
    """Per step: time, diversity (per condition and mean), distance to the teacher's final sample."""
    out = []
    for k, (t, x) in enumerate(zip(traj.times, traj.x0)):
        per = diversity(x, rows)
        known = [d for d in per if d is not None]
        out.append({"step": k, "t": round(t, 6), "diversity": sum(known) / len(known) if known else None,
                    "diversity_per_condition": dict(zip(rows.names, per)),
                    "distance_to_teacher_final": float(rms(x, final).mean())})
    return out


# ------------------------------------------------------------------------------------ the grid


def save_grid(trajectories: list[Trajectory], rows: Rows, path: Path) -> Path:
    """One panel per trajectory (columns = steps, titled with t), rows = condition x seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    n_rows = len(rows.row_seeds)
    widths = [len(tr.x0) for tr in trajectories]
    fig, axes = plt.subplots(1, len(trajectories), figsize=(1.2 + 0.75 * sum(widths) + 0.4 * len(widths), 0.9 + 0.75 * n_rows),
                             gridspec_kw={"width_ratios": widths}, squeeze=False, dpi=100)
    for ax, tr in zip(axes[0], trajectories):
        tiles = torch.stack(tr.x0, 1).flatten(0, 1)  # [R * K, C, H, W], row-major: row r, step k
        tiles = tiles[:, :3] if tiles.shape[1] >= 3 else tiles[:, :1]
        grid = make_grid(tiles * 0.5 + 0.5, nrow=len(tr.x0), padding=1, pad_value=1.0)  # [3, H', W']
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        h, w = tiles.shape[-2] + 1, tiles.shape[-1] + 1
        ax.set_xticks([1 + w * (k + 0.5) for k in range(len(tr.x0))], [f"{t:.2f}" for t in tr.times], fontsize=7)
        ax.set_yticks([1 + h * (r + 0.5) for r in range(n_rows)],
                      [f"{rows.names[r // len(rows.seeds)][:18]} s{rows.row_seeds[r]}" for r in range(n_rows)], fontsize=7)
        ax.set_title(tr.name, fontsize=8)
        ax.set_xlabel("t of the step", fontsize=7)
    for ax in axes[0][1:]:
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ the command


def _student_side(model: str, kind: str, teacher_name: str | None, device, use_ema: bool):
    """(student source, teacher, teacher view) for MODEL; the teacher is the student's own unless named."""
    from .evaluation.hybrid import TeacherView
    from .teachers import load_teacher
    from .training.run import load_student

    if kind == "teacher":
        if teacher_name is not None:
            raise StepdistillError("MODEL is a teacher: drop --teacher (it is for run directories and pipelines)")
        return None, load_teacher(model), None
    if kind == "student":
        loaded = load_student(model, device, use_ema)
        if teacher_name is not None:
            return loaded, load_teacher(teacher_name), None
        return loaded, loaded.teacher, TeacherView(loaded.teacher.denoiser, lora=loaded.trainable.adapter is not None)
    meta_path = Path(model) / "stepdistill_export.json"
    name = teacher_name or (json.loads(meta_path.read_text()).get("teacher") if meta_path.is_file() else None)
    if name is None:
        raise StepdistillError(f"{model} does not name its teacher (no stepdistill_export.json): give --teacher")
    return model, load_teacher(name), None


def inspect_model(model: str, out: str | Path, teacher: str | None = None, steps: int = 8, seeds: Sequence[int] = (0, 1, 2, 3),
                  labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                  student_steps: int | None = None, device="cpu", use_ema: bool = True, trust_remote_code: bool = False,
                  hybrid: tuple[int, int] | None = None) -> dict:
    """Write the step grid ``out`` (PNG) and its numbers (``out`` with .json); returns the numbers.

    Args:
        model: a teacher (embedded name or folder), a run directory or an exported pipeline folder.
        teacher: the teacher of the reference rows (default: the student's own; MODEL itself for a teacher).
        steps: the teacher's DDIM steps N; student_steps: an exported pipeline's step count (default: its first).
        seeds, labels, prompts: rows are every (condition, seed) pair.
        hybrid: (k, N) for a run directory: also the hybrid sampler's panel (teacher's first k of N steps, then the student).
    """
    from .evaluation.sources import model_kind

    if steps < 1:
        raise StepdistillError(f"--steps must be >= 1 teacher steps, got {steps}")
    kind = model_kind(model)
    if hybrid is not None and kind != "student":
        raise StepdistillError("--hybrid-teacher-steps needs a training run directory as MODEL")
    source, teach, view = _student_side(model, kind, teacher, device, use_ema)
    teach.denoiser.to(device)
    rows = make_rows(teach, seeds, labels, prompts)
    trajs = [teacher_trajectory(teach, rows, steps, guidance_scale, device, view)]
    if kind == "student":
        trajs.append(student_trajectory(source, rows, device))
        if hybrid is not None:
            trajs.append(hybrid_trajectory(source, rows, hybrid[0], hybrid[1], guidance_scale, device))
    elif kind == "pipeline":
        trajs.append(pipeline_trajectory(source, teach, rows, student_steps, device, trust_remote_code))
    final = trajs[0].x0[-1]
    out = Path(out)
    save_grid(trajs, rows, out)
    numbers = {"model": model, "kind": kind, "teacher": teach.name, "grid": str(out),
               "rows": [{"condition": rows.names[r // len(rows.seeds)], "seed": s} for r, s in enumerate(rows.row_seeds)],
               "distance": "RMS over pixels of decoded images in [-1, 1]; diversity: mean over seed pairs of one condition",
               "trajectories": [{"name": tr.name, "times": tr.times, "steps": step_numbers(tr, rows, final)} for tr in trajs]}
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers


def add_inspect_arguments(p) -> None:
    """The ``inspect`` sub-command's arguments (argparse parser ``p``)."""
    p.add_argument("model", metavar="MODEL", help="embedded teacher name or teacher folder, run directory, or exported pipeline folder")
    p.add_argument("--out", required=True, help="the PNG grid to write; its numbers go to the same name with .json")
    p.add_argument("--teacher", help="teacher of the reference rows (default: the run's / pipeline's own teacher)")
    p.add_argument("--steps", type=positive_int, default=8, help="teacher DDIM steps (default: 8)")
    p.add_argument("--student-steps", type=positive_int, help="exported pipelines: num_inference_steps (default: its first exported count)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2, 3], help="noise seeds, one row each per condition (default: 0 1 2 3)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labels", type=nonneg_int, nargs="+", help="class labels (class-conditional teachers; default: 0 1 2)")
    group.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (text teachers)")
    p.add_argument("--guidance-scale", type=finite_float, help="teacher CFG scale (default: its recommended_guidance_scale)")
    p.add_argument("--hybrid-teacher-steps", type=nonneg_int, metavar="K", help="run directories: add the hybrid sampler's panel "
                   "(the teacher's first K steps of a --hybrid-schedule grid, then the student)")
    p.add_argument("--hybrid-schedule", type=positive_int, default=4, metavar="N", help="the hybrid teacher's step grid (default: 4)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--no-ema", action="store_true", help="run directories: raw student weights instead of the EMA")
    p.add_argument("--trust-remote-code", action="store_true", help="allow an exported folder's own pipeline .py to load")


def run_inspect(args) -> int:
    """The ``stepdistill inspect`` command."""
    from .conditioning import read_prompt_file

    prompts = read_prompt_file(args.prompts) if args.prompts else None
    numbers = inspect_model(args.model, args.out, args.teacher, args.steps, args.seeds, args.labels, prompts,
                            args.guidance_scale, args.student_steps, args.device, not args.no_ema, args.trust_remote_code,
                            None if args.hybrid_teacher_steps is None else (args.hybrid_teacher_steps, args.hybrid_schedule))
    print(json.dumps({"grid": numbers["grid"], "numbers": str(Path(args.out).with_suffix(".json")),
                      "trajectories": [t["name"] for t in numbers["trajectories"]]}, indent=1))
    return 0


__all__ = ["inspect_model", "teacher_trajectory", "student_trajectory", "hybrid_trajectory", "pipeline_trajectory", "make_rows", "Trajectory", "Rows"]
