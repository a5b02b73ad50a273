"""Hybrid inference (diversity distillation): the teacher takes the first k steps, the student finishes.

Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models" (arXiv:2503.10637):
a distilled model's loss of diversity is decided in the first, high-noise step; running the base
model for that step only and the distilled model for the rest restores most of the diversity.

The hand-over, as implemented here:

* the teacher runs its own deterministic solver, as ``stepdistill eval`` samples teachers
  (``sources.solver_steps``: diffusers' ``DDIMScheduler``, eta 0, ``timestep_spacing="trailing"``
  and the teacher's clipping, or ``FlowMatchEulerDiscreteScheduler`` for flow teachers; CFG at
  ``guidance_scale`` on the native output) from t = 1 for the first k steps of its N-step grid
  (N = ``schedule_steps``, 0 <= k < N), reaching x_s at the time s that solver steps to
  (DDIM: timestep t_{k-1} - T // N, so s = 749/999 for k = 1 of N = 4; flow: sigma_k);
* the student then runs its own few-step sampler from x_s at the times (s, t_j for every one of
  its own times t_j < s): a one-step student is evaluated once, at s. A student trained only
  at its own times (a DMD or consistency student at t ~ 1) sees x_s off its training
  distribution; ``stepdistill eval`` measures the result instead of assuming it;
* k = 0 is exactly the student alone (same noise, same times).

NFE per image: k teacher steps (2 each with CFG, both rows counted) + the student's steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..contract import Cond, Denoiser, StepdistillError
from ..sampling import few_step_sample, init_noise_sigma


def check_hybrid(teacher_steps: int, schedule_steps: int) -> None:
    """0 <= k < N, one-line errors otherwise."""
    if schedule_steps < 1:
        raise StepdistillError(f"--hybrid-schedule must be >= 1 teacher steps, got {schedule_steps}")
    if not 0 <= teacher_steps < schedule_steps:
        raise StepdistillError(f"--hybrid-teacher-steps {teacher_steps} does not fit a {schedule_steps}-step teacher schedule: "
                               f"use 0 <= k < {schedule_steps} (the student must take at least the last step), "
                               "or raise --hybrid-schedule")


class TeacherView:
    """The teacher's diffusers denoiser; with a LoRA student on its base, adapters off before every call."""

    def __init__(self, denoiser, lora: bool = False):
        self.denoiser, self.lora = denoiser, lora

    @property
    def schedule(self):
        return self.denoiser.schedule

    def model_output(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.lora:
            from ..training.networks import set_active_adapter

            set_active_adapter(self.denoiser, None)
        return self.denoiser.model_output(x, t, cond)


def teacher_solver(teacher, schedule_steps: int):
    """The teacher's deterministic diffusers solver at N steps: DDIM (VP) or flow Euler (flow)."""
    from .sources import solver_scheduler

    if teacher.folder is None or not hasattr(teacher.denoiser, "model_output"):
        raise StepdistillError(f"teacher {teacher.name!r} is not a diffusers teacher; hybrid inference needs an image teacher folder")
    config = json.loads((teacher.folder / "scheduler" / "scheduler_config.json").read_text())
    return solver_scheduler("flow-euler" if teacher.denoiser.schedule.kind == "flow" else "ddim", config, schedule_steps)


def handover_time(sched, schedule, teacher_steps: int) -> float:
    """The continuous time s that k steps of ``sched`` reach (what its ``step`` steps to)."""
    if type(sched).__name__ == "FlowMatchEulerDiscreteScheduler":
        return float(sched.sigmas[teacher_steps])
    prev = int(sched.timesteps[teacher_steps - 1]) - sched.config.num_train_timesteps // sched.num_inference_steps  # DDIMScheduler.step
    return float(schedule.from_native(torch.tensor(float(prev))))


def hybrid_student_times(student_times: Sequence[float], s: float) -> tuple[float, ...]:
    """The student's times after the hand-over at s: s itself, then its own times below s."""
    return (s, *(float(t) for t in student_times if t < s - 1e-6))


@torch.no_grad()
def hybrid_sample(
    teacher,
    student: Denoiser,
    student_times: Sequence[float],
    noise: Tensor,
    cond: Cond | None,
    null_cond: Cond | None = None,
    teacher_steps: int = 1,
    schedule_steps: int = 4,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[tuple[int, ...]], Tensor] | None = None,
    teacher_denoiser=None,
) -> Tensor:
    """Teacher for the first k of its N solver steps, then the student (see the module docstring).

    Args:
        teacher: the ``Teacher`` (its folder's scheduler config gives the solver).
        student: the student denoiser; ``student_times`` its own times (descending).
        noise: [B, ...] unit Gaussian noise, the input of both.
        cond, null_cond: conditions of the batch; ``guidance_scale`` is the teacher's CFG scale.
        teacher_steps, schedule_steps: k and N (0 <= k < N); k = 0 is the student alone.
        generator, noise_fn: the student's re-noising noise (as ``few_step_sample``).
        teacher_denoiser: what the teacher steps call (default ``TeacherView(teacher.denoiser)``).
    Returns:
        x0_hat [B, ...] (latents for latent teachers).
    """
    from .sources import solver_steps

    check_hybrid(teacher_steps, schedule_steps)
    if teacher_steps == 0:
        return few_step_sample(student, noise, cond, student_times, generator, noise_fn=noise_fn)
    sched = teacher_solver(teacher, schedule_steps)
    view = teacher_denoiser or TeacherView(teacher.denoiser)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # [B, ...] pure noise at t = 1
    x = solver_steps(view, sched, x, cond or {}, null_cond, guidance_scale, count=teacher_steps)  # x_s
    times = hybrid_student_times(student_times, handover_time(sched, view.schedule, teacher_steps))
    return few_step_sample(student, x / init_noise_sigma(student.schedule), cond, times, generator, noise_fn=noise_fn)


def hybrid_sampler(run_dir: str | Path, teacher_steps: int = 1, schedule_steps: int = 4, guidance_scale: float | None = None,
                   device="cpu", use_ema: bool = True, model: str | None = None):
    """A ``ModelSampler`` (kind "hybrid") of a run directory's student with the first k teacher steps."""
    from ..training.run import load_student
    from .seeding import Conditions, per_sample_randn, sample_generators
    from ..training.networks import inner_model
    from .sources import SOLVER_NAMES, ModelSampler, cond_dicts, distilled_guidance, finish_samples, teacher_prompts

    check_hybrid(teacher_steps, schedule_steps)
    loaded = load_student(run_dir, device, use_ema)
    teacher, times = loaded.teacher, tuple(loaded.times)
    teacher_view = TeacherView(teacher.denoiser, lora=loaded.trainable.adapter is not None)
    w = float(teacher.info.get("recommended_guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    teacher.denoiser.to(device)

    @torch.no_grad()
    def generate(seeds: Sequence[int], conds: Conditions) -> Tensor:
        cond, null = cond_dicts(teacher.conditioner, conds, device)
        gens = sample_generators(seeds)
        noise = per_sample_randn(gens, teacher.sample_shape).to(device)  # [B, *shape]
        x0 = hybrid_sample(teacher, loaded.view, times, noise, cond, null, teacher_steps, schedule_steps, w,
                           noise_fn=lambda shape: per_sample_randn(gens, shape[1:]), teacher_denoiser=teacher_view)
        return finish_samples(teacher, x0)

    uses_cfg = teacher_steps > 0 and w not in (0.0, 1.0)  # guided(): both rows in one call, 2 evaluations
    sched = teacher_solver(teacher, schedule_steps)
    s = handover_time(sched, teacher.denoiser.schedule, teacher_steps) if teacher_steps else times[0]
    after = hybrid_student_times(times, s) if teacher_steps else times
    nfe = teacher_steps * (2 if uses_cfg else 1) + len(after)
    info = dict(loaded.info) | {"times": list(times), "distilled_guidance_scale": distilled_guidance(loaded.cfg), "hybrid": {
        "teacher_steps": teacher_steps, "schedule_steps": schedule_steps, "handover_time": s,
        "student_times_after_handover": list(after), "teacher_solver": type(sched).__name__,
        "teacher_timesteps": [round(float(v), 3) for v in sched.timesteps[:teacher_steps]],
        "teacher_guidance_scale": w, "nfe": nfe,
        "nfe_formula": f"{teacher_steps} teacher step(s) x {2 if uses_cfg else 1} + {len(after)} student step(s)"}}
    networks = list({id(m): m for m in (inner_model(teacher.denoiser), inner_model(loaded.view.module))}.values())
    name = SOLVER_NAMES["flow-euler" if teacher.denoiser.schedule.kind == "flow" else "ddim"]
    solver = f"teacher {name} {teacher_steps}/{schedule_steps} + student"
    return ModelSampler(model or str(run_dir), "hybrid", solver, len(after), w if teacher_steps else None,
                        generate, networks, teacher.num_classes, teacher_prompts(teacher), info)


# ---------------------------------------------------------------------------------- exported pipelines

UNPACKED_FLOW = ("StableDiffusion3Pipeline", "SanaPipeline")  # flow pipelines that take latents as the network sees them


def check_export_teacher(folder: str | Path, teacher: str | None = None) -> str:
    """The teacher a hybrid sampler of an exported pipeline runs (``teacher`` or the export's own), resolved
    before any sampling; one-line errors when the export does not name it or it is not here."""
    from ..teachers import ANALYTIC, resolve_teacher_folder
    from .sources import export_meta

    meta = export_meta(folder)
    if not meta.get("student_times"):
        raise StepdistillError(f"{str(folder)!r} is not a stepdistill export (no stepdistill_export.json with student_times): "
                               "hybrid inference needs the student's times")
    name = teacher or meta.get("teacher")
    if not name:
        raise StepdistillError(f"{str(folder)!r} does not name its teacher; give --hybrid-teacher NAME_OR_FOLDER")
    if name in ANALYTIC:
        raise StepdistillError(f"teacher {name!r} is analytic; hybrid inference needs an image teacher folder")
    try:
        resolve_teacher_folder(name)
    except StepdistillError as e:
        raise StepdistillError(f"{e} (the hybrid teacher of {str(folder)!r}; --hybrid-teacher names another)") from None
    return name


def pipeline_hybrid_sampler(folder: str | Path, steps: int, teacher_steps: int = 1, schedule_steps: int = 4,
                            guidance_scale: float | None = None, device="cpu", trust_remote_code: bool = False,
                            teacher: str | None = None, prompts=None, model: str | None = None):
    """A ``ModelSampler`` (kind "hybrid") of an exported pipeline: the teacher's first k of N solver steps,
    then the exported student through its own pipeline ``__call__``.

    The teacher is the export's (``stepdistill_export.json``: ``teacher``) or ``teacher`` (a name, folder or
    cached model id). The class-conditional pipeline gets the teacher network and scheduler through its
    own hybrid option (``teacher=``, ``teacher_scheduler=``, ``teacher_steps=``); stock diffusers pipelines
    get the teacher's x_s as ``latents`` and the hand-over time plus their own later times as
    ``timesteps`` (VP) or ``sigmas`` (flow), so the stock ``__call__`` runs the student's part.
    """
    import inspect

    from ..teachers import load_teacher
    from ..training.networks import inner_model
    from .seeding import Conditions, per_sample_randn, sample_generators
    from .sources import (DIGITS, SOLVER_NAMES, TEXT, ModelSampler, _images_to_tensor, cond_dicts, digits_captions_teacher,
                          export_meta, load_pipeline, pipeline_call_kwargs, solver_steps)

    check_hybrid(teacher_steps, schedule_steps)
    name = check_export_teacher(folder, teacher)
    meta = export_meta(folder)
    own = meta["student_times"].get(str(steps))
    if own is None:
        raise StepdistillError(f"exported pipeline {str(folder)!r} replays its student at --steps "
                               f"{' '.join(meta['student_times'])} only, not {steps}")
    text_prompts = None if prompts in (None, DIGITS, TEXT) else list(prompts)
    tea = load_teacher(name, prompts=text_prompts)
    pipe = load_pipeline(folder, device, trust_remote_code)
    params = inspect.signature(pipe.__call__).parameters
    custom = "teacher_steps" in params  # stepdistill's class-conditional pipeline: its own hybrid option
    flow = tea.denoiser.schedule.kind == "flow"
    pipe_name = type(pipe).__name__
    if not custom and not ("latents" in params and ("sigmas" if flow else "timesteps") in params):
        raise StepdistillError(f"{pipe_name} takes no latents/{'sigmas' if flow else 'timesteps'}: "
                               "hybrid inference through this pipeline is not supported")
    if not custom and flow and pipe_name not in UNPACKED_FLOW:
        raise StepdistillError(f"hybrid inference through {pipe_name} is not supported yet (its latents are packed); "
                               "evaluate the run directory with --hybrid-teacher-steps instead")
    w = float(tea.info.get("recommended_guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    null_of = getattr(tea.conditioner, "null", None)
    if null_of is None or null_of(1) is None:  # no unconditional branch: the teacher runs unguided
        w = 1.0
    sched = teacher_solver(tea, schedule_steps)
    s = handover_time(sched, tea.denoiser.schedule, teacher_steps)
    after = hybrid_student_times(own, s)
    export_call = dict((meta.get("call_kwargs") or {}).get(str(steps)) or {})
    for key in ("num_inference_steps", "timesteps", "sigmas", "latents"):
        export_call.pop(key, None)
    if prompts is None and "prompt" in params:
        prompts = meta.get("prompts") or (DIGITS if digits_captions_teacher(meta.get("teacher")) else TEXT)
    last = getattr(tea.denoiser.schedule, "num_train_timesteps", 1000) - 1
    config = json.loads((tea.folder / "scheduler" / "scheduler_config.json").read_text())
    net = inner_model(tea.denoiser)
    tea.denoiser.to(device)

    @torch.no_grad()
    def generate(seeds: Sequence[int], conds: Conditions) -> Tensor:
        from diffusers.utils import logging as dlogging

        gens = sample_generators(seeds)
        noise = per_sample_randn(gens, tea.sample_shape).to(device)  # [B, *shape]
        kwargs = pipeline_call_kwargs(params, seeds, conds, steps, None, export_call)
        if custom:
            kwargs |= {"latents": noise, "teacher": net, "teacher_scheduler": _scheduler_from(config),
                       "teacher_steps": teacher_steps, "teacher_schedule": schedule_steps, "teacher_guidance_scale": w,
                       "teacher_null_class": getattr(tea.conditioner, "null_class", None)}
        else:
            cond, null = cond_dicts(tea.conditioner, conds, device)
            fresh = teacher_solver(tea, schedule_steps)
            x = solver_steps(TeacherView(tea.denoiser), fresh, noise * getattr(fresh, "init_noise_sigma", 1.0), cond, null, w,
                             count=teacher_steps)
            kwargs["latents"] = x
            if flow:
                kwargs["sigmas"] = [float(t) for t in after]
            else:
                kwargs["timesteps"] = [int(round(float(t) * last)) for t in after]
            kwargs.pop("num_inference_steps", None)
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # LCMScheduler warns about timesteps off its distillation grid: expected here
        try:
            out = pipe(**kwargs)
        finally:
            dlogging.set_verbosity(level)
        return _images_to_tensor(out.images if hasattr(out, "images") else out[0])

    uses_cfg = w not in (0.0, 1.0)
    nfe = teacher_steps * (2 if uses_cfg else 1) + len(after)
    info = {"pipeline": pipe_name, "folder": str(folder), "teacher": name, "times": list(own), "hybrid": {
        "teacher_steps": teacher_steps, "schedule_steps": schedule_steps, "handover_time": s,
        "student_times_after_handover": list(after), "teacher_solver": type(sched).__name__,
        "teacher_timesteps": [round(float(v), 3) for v in sched.timesteps[:teacher_steps]],
        "teacher_guidance_scale": w, "nfe": nfe, "through": "pipeline teacher option" if custom else "latents + " + ("sigmas" if flow else "timesteps"),
        "nfe_formula": f"{teacher_steps} teacher step(s) x {2 if uses_cfg else 1} + {len(after)} student step(s)"}}
    networks = list({id(m): m for m in [net] + [m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None))
                                                  if isinstance(m, torch.nn.Module)]}.values())
    solver = f"teacher {SOLVER_NAMES['flow-euler' if flow else 'ddim']} {teacher_steps}/{schedule_steps} + exported student"
    return ModelSampler(model or str(folder), "hybrid", solver, len(after), w, generate, networks,
                        int(meta.get("num_classes") or tea.num_classes), prompts if "prompt" in params else None, info)


def _scheduler_from(config: dict):
    """The teacher's own diffusers scheduler (its folder's scheduler_config.json)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if not k.startswith("_")})


__all__ = ["hybrid_sample", "hybrid_sampler", "pipeline_hybrid_sampler", "check_export_teacher", "handover_time", "hybrid_student_times", "check_hybrid", "teacher_solver",
           "TeacherView"]
