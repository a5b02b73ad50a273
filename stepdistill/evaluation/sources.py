"""Model sources: what ``stepdistill eval MODEL`` can sample, as seeded ``ModelSampler``s.

* **teacher** (embedded name or teacher folder) with a fast solver at a step count: the
  diffusers scheduler's own ``set_timesteps`` / ``scale_model_input`` / ``step`` driven by a
  small loop over the teacher's network in its native parameterisation (the contract adapter's
  ``model_output``), classifier-free guidance combined in that space (for a fixed t it equals
  CFG in x0 space). VP teachers: ``ddim`` (eta 0), ``dpm++`` (DPMSolverMultistepScheduler,
  ``dpmsolver++``, order 2), ``unipc``; flow teachers: ``flow-euler``
  (FlowMatchEulerDiscreteScheduler). VP solvers use ``timestep_spacing="trailing"`` so one step
  starts at t = 999 (Lin et al. 2024, arXiv:2305.08891, Table 2); the rest of the teacher's
  scheduler config (betas, prediction type, clipping) is kept.
* **student** of a training run directory: ``config.yaml`` + the latest checkpoint, sampled at
  the run's ``student.times`` (x0-then-re-noise, ``few_step_sample`` with per-sample noise).
* **hybrid** of a training run directory (``--hybrid-teacher-steps k``): the teacher takes the
  first k DDIM steps of an N-step schedule, the student finishes from x_s (``hybrid.py``: the
  hand-over and its NFE, k teacher steps x 2 with CFG + the student's steps).
* **pipeline**: an exported folder loaded with ``DiffusionPipeline.from_pretrained`` and called
  with ``num_inference_steps``, ``output_type="pt"``, one generator per sample, the prompts, and the
  export's own ``call_kwargs`` for that step count (``stepdistill_export.json``: sigmas, guidance off,
  resolution), so the stock pipeline replays the trained student; only the exported step counts.
  A text family's own folder (``model_index.json`` of e.g. ``StableDiffusionPipeline`` without
  ``stepdistill_export.json``) is a teacher, sampled with the solvers above.

Every sampler maps (seeds [B], Conditions) to images [B, C, H, W] in [-1, 1]; sample i uses
only the generator seeded with its own seed.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..conditioning import ClassLabels, Prompts, concat_cond
from ..contract import StepdistillError, as_time
from ..training.networks import inner_model
from .seeding import Conditions, per_sample_randn, sample_generators

VP_SOLVERS = {
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"}),
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
}
FLOW_SOLVERS = {"flow-euler": ("FlowMatchEulerDiscreteScheduler", {})}
SOLVER_NAMES = {"ddim": "DDIM", "dpm++": "DPM-Solver++(2M)", "unipc": "UniPC", "flow-euler": "FlowMatchEuler"}
DIGITS = "digits"  # ModelSampler.prompts: the digit captions (labels known, so digits accuracy applies)
TEXT = "text"  # ModelSampler.prompts: prompt-conditioned, waiting for the user's --prompts (use_prompts)


@dataclass
class ModelSampler:
    """One model at one setting, ready to generate seeded samples."""

    model: str  # the name given on the command line
    kind: str  # teacher | student | hybrid | pipeline
    solver: str
    steps: int
    guidance_scale: float | None
    generate: Callable[[Sequence[int], Conditions], Tensor]  # (seeds, conditions) -> [B, C, H, W] in [-1, 1]
    networks: list[nn.Module]  # every forward call of these counts as network evaluations (NFE)
    num_classes: int = 0
    prompts: str | list[str] | None = None  # DIGITS (digit captions), TEXT (needs --prompts), a prompt list, or None
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        guide = f", w={self.guidance_scale:g}" if self.guidance_scale not in (None, 1.0) else ""
        distilled = self.info.get("distilled_guidance_scale")  # a student's: the teacher CFG it was distilled toward
        guide += f", distilled w={distilled:g}" if distilled not in (None, 1.0) else ""
        return f"{self.model} [{self.kind}] {SOLVER_NAMES.get(self.solver, self.solver)} {self.steps} step{'s' * (self.steps != 1)}{guide}"


# ------------------------------------------------------------------------------------ resolving


def model_kind(spec: str) -> str:
    """teacher | student | pipeline for a MODEL argument (one-line error if none fits)."""
    from ..teachers import assets_dir

    path = Path(spec)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "student"
    if (path / "stepdistill_teacher.json").is_file() or ("/" not in spec and (assets_dir() / "teachers" / spec).is_dir()):
        return "teacher"
    if (path / "model_index.json").is_file() and not (path / "stepdistill_export.json").is_file() and _family_teacher(path):
        return "teacher"  # a text family's own folder (StableDiffusionPipeline, FluxPipeline, ...): what training distils
    if (path / "model_index.json").is_file():
        return "pipeline"
    if path.is_dir() and (path / "scheduler").is_dir() and ((path / "unet").is_dir() or (path / "transformer").is_dir()):
        return "teacher"
    raise StepdistillError(f"MODEL {spec!r} is not an embedded teacher name, a teacher folder, a run directory "
                           "(config.yaml + checkpoints/) or an exported pipeline folder (model_index.json)")


def _family_teacher(folder: Path) -> bool:
    """A folder whose model_index.json names a text family's pipeline, with its network and scheduler saved."""
    from ..adapters.families import families

    try:
        pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        return False
    fam = next((f for f in families().values() if pipeline in f.pipeline_classes), None)
    return (fam is not None and fam.text and (folder / "scheduler").is_dir()
            and ((folder / "unet").is_dir() or (folder / "transformer").is_dir()))


def teacher_prompts(teacher) -> str | None:
    """Prompts of a teacher's samples: ``DIGITS`` for a teacher trained on the digit captions (its
    stepdistill_teacher.json says ``default_prompts: digits``, as the embedded digits-sd), ``TEXT`` for any
    other prompt-conditioned teacher (the user's ``--prompts`` must replace it: ``use_prompts``), else None."""
    if not isinstance(teacher.conditioner, Prompts):
        return None
    return DIGITS if (teacher.info or {}).get("default_prompts") == "digits" else TEXT


def digits_captions_teacher(name: str | None) -> bool:
    """Whether a teacher named in a run or export (embedded name or folder) is trained on the digit captions."""
    if not name:
        return False
    from ..teachers import resolve_teacher_folder

    try:
        meta = resolve_teacher_folder(name) / "stepdistill_teacher.json"
        return meta.is_file() and json.loads(meta.read_text()).get("default_prompts") == "digits"
    except (StepdistillError, OSError, json.JSONDecodeError):
        return False


def text_teacher_needs_prompts(spec: str) -> bool:
    """A teacher folder of a text family that has no digit captions of its own (so eval needs --prompts)."""
    from ..teachers import resolve_teacher_folder

    folder = resolve_teacher_folder(spec)
    meta = folder / "stepdistill_teacher.json"
    if meta.is_file() and json.loads(meta.read_text()).get("default_prompts") == "digits":
        return False
    if (folder / "model_index.json").is_file() and _family_teacher(folder):
        return True
    return (folder / "tokenizer").is_dir() or (folder / "text_encoder").is_dir()


def needs_prompts(spec: str) -> bool:
    """Whether MODEL (any kind) is text-to-image without digit captions of its own, read from its files only."""
    kind = model_kind(spec)
    if kind == "teacher":
        return text_teacher_needs_prompts(spec)
    if kind == "student":
        from ..config import load_config

        name = load_config(str(Path(spec) / "config.yaml")).teacher.name
        try:
            return text_teacher_needs_prompts(name)
        except StepdistillError:  # analytic presets and teachers no longer on disk: decided when loaded
            return False
    meta = export_meta(spec)
    index = json.loads((Path(spec) / "model_index.json").read_text())
    return isinstance(index.get("tokenizer"), list) and index["tokenizer"][0] is not None and not (
        meta.get("prompts") or digits_captions_teacher(meta.get("teacher")))


def use_prompts(sampler: "ModelSampler", prompts: list[str] | None) -> "ModelSampler":
    """Give a prompt-conditioned sampler the user's ``--prompts`` (class-conditional and unconditional ones
    keep their conditions); one-line error for a text model without them."""
    if sampler.prompts is None:
        return sampler
    if prompts:
        sampler.info["digits_teacher"] = sampler.prompts == DIGITS  # its images are still digits
        sampler.prompts = list(prompts)
    elif sampler.prompts == TEXT:
        raise StepdistillError(f"{sampler.model!r} is a text-to-image model: give --prompts FILE (one prompt per line); "
                               "samples cycle through them, one seed each")
    return sampler


def cond_dicts(conditioner, conds: Conditions, device) -> tuple[dict, dict | None]:
    from ..training.data import to_device

    if isinstance(conditioner, Prompts):
        if conds.prompts is None:
            raise StepdistillError("this model is prompt-conditioned but no prompts were given")
        cond, null = conditioner.texts(list(conds.prompts))
    elif isinstance(conditioner, ClassLabels):
        cond, null = conditioner.labelled(conds.labels)
    else:
        cond, null = {}, None
    return to_device(cond, device), to_device(null, device)


# ------------------------------------------------------------------------------------ teachers


def solver_scheduler(solver: str, scheduler_config: dict, steps: int):
    """A diffusers scheduler for ``solver`` built from the teacher's scheduler config, timesteps set."""
    import diffusers

    is_flow = "FlowMatch" in scheduler_config.get("_class_name", "")
    table = FLOW_SOLVERS if is_flow else VP_SOLVERS
    if solver not in table:
        raise StepdistillError(f"solver {solver!r} does not fit a {'flow' if is_flow else 'VP'} teacher; "
                               f"use one of {', '.join(table)}")
    if steps < 1:
        raise StepdistillError(f"--steps must be >= 1, got {steps}")
    config = {k: v for k, v in scheduler_config.items() if k != "_use_default_values"}
    sched = getattr(diffusers, table[solver][0]).from_config(config, **solver_overrides(solver, config))
    sched.set_timesteps(steps)
    return sched


def solver_overrides(solver: str, scheduler_config: dict) -> dict:
    """Scheduler settings changed from the teacher's config for ``solver``.

    A teacher trained with ``clip_sample`` (x0 clipped to [-r, r] by DDIM) gets the same clipping
    in DPM-Solver++ / UniPC through ``thresholding`` with ``sample_max_value = r`` (the dynamic
    threshold s = clamp(quantile, 1, r) is then exactly r = 1 for r = 1). Without it, x0 predicted
    at t = 999 of a cosine schedule (alpha ~ 1e-4) is unbounded and multistep solvers never recover.
    """
    overrides = dict((VP_SOLVERS | FLOW_SOLVERS)[solver][1])
    if solver in ("dpm++", "unipc") and scheduler_config.get("clip_sample"):
        overrides |= {"thresholding": True, "sample_max_value": float(scheduler_config.get("clip_sample_range", 1.0))}
    return overrides


def guided_output(denoiser, x: Tensor, t: Tensor, cond: dict, null: dict | None, scale: float) -> Tensor:
    """CFG on the network's native output: u + w (c - u) (w = 1: conditional only, one evaluation)."""
    if null is None or scale == 1.0:
        return denoiser.model_output(x, t, cond)
    both = denoiser.model_output(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, null))  # [2B, ...]
    c, u = both.float().chunk(2)
    return u + scale * (c - u)


def solver_steps(denoiser, sched, x: Tensor, cond: dict, null: dict | None, w: float, count: int | None = None) -> Tensor:
    """The first ``count`` (default: all) steps of a diffusers solver from x at its first timestep; x after them."""
    schedule = denoiser.schedule
    kwargs = step_kwargs(sched)
    for ts in sched.timesteps[:count]:
        t = as_time(schedule.from_native(ts.float()), x)  # [B] continuous time of this native timestep
        x_in = sched.scale_model_input(x, ts) if hasattr(sched, "scale_model_input") else x  # flow: no scaling
        out = guided_output(denoiser, x_in, t, cond, null, w)
        x = sched.step(out.to(x.dtype), ts, x, **kwargs).prev_sample
    return x


def step_kwargs(sched) -> dict:
    """``step`` arguments of a solver: DDIM with a clipped x0 (``clip_sample`` / ``thresholding``) steps with
    the noise recomputed from the clipped x0 (``use_clipped_model_output``), as DDIM's derivation and
    ``sampling.ddim_sample`` do. Without it the raw eps is paired with the clipped x0, and on a cosine
    schedule (alpha(999) ~ 5e-5) that mismatch grows with the step count: digits-unet at w=2 scored FID
    7.0 at 50 steps against 1.5 at 16 (200 samples); with it, 1.6 at 50."""
    import inspect

    clips = sched.config.get("clip_sample") or sched.config.get("thresholding")
    takes = "use_clipped_model_output" in inspect.signature(type(sched).step).parameters  # the class's: inspect wraps the instance's
    return {"use_clipped_model_output": True} if clips and takes else {}


def teacher_sampler(teacher, solver: str, steps: int, guidance_scale: float | None = None, device="cpu",
                    model: str | None = None) -> ModelSampler:
    """A teacher sampled with a diffusers solver (see the module docstring)."""
    denoiser = teacher.denoiser
    if not hasattr(denoiser, "model_output") or teacher.folder is None:
        raise StepdistillError(f"teacher {teacher.name!r} is not a diffusers teacher; eval needs an image teacher folder")
    config = json.loads((teacher.folder / "scheduler" / "scheduler_config.json").read_text())
    w = float(teacher.info.get("recommended_guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    sched = solver_scheduler(solver, config, steps)  # checks solver and steps now
    shape = teacher.sample_shape
    denoiser.to(device)

    @torch.no_grad()
    def generate(seeds: Sequence[int], conds: Conditions) -> Tensor:
        sched = solver_scheduler(solver, config, steps)  # multistep solvers keep state: a fresh one per batch
        cond, null = cond_dicts(teacher.conditioner, conds, device)
        x = per_sample_randn(sample_generators(seeds), shape).to(device) * getattr(sched, "init_noise_sigma", 1.0)  # [B, *shape]
        return finish_samples(teacher, solver_steps(denoiser, sched, x, cond, null, w))

    info = {"scheduler": type(sched).__name__, "timesteps": [round(float(v), 3) for v in sched.timesteps],
            "scheduler_overrides": solver_overrides(solver, config), "step_kwargs": step_kwargs(sched), "teacher_folder": str(teacher.folder), "teacher": teacher.name}
    return ModelSampler(model or teacher.name, "teacher", solver, steps, w, generate, [inner_model(denoiser)],
                        teacher.num_classes, teacher_prompts(teacher), info)


def finish_samples(teacher, x: Tensor) -> Tensor:
    """Latents -> images through the teacher's VAE; clamp to [-1, 1]."""
    if teacher.decode is not None:
        x = teacher.decode(x)
    return x.float().clamp(-1, 1)



# ------------------------------------------------------------------------------------ students


def seeded_few_step_sample(student, noise: Tensor, cond, times: Sequence[float], generators: list[torch.Generator]) -> Tensor:
    """``sampling.few_step_sample`` with the re-noising noise of row b drawn from generators[b].

    Equal to ``few_step_sample(student, noise[b:b+1], cond_b, times, generators[b])`` row by row
    (tested), so multi-step students do not depend on the batch size either.
    """
    from ..sampling import few_step_sample

    return few_step_sample(student, noise, cond, times, noise_fn=lambda shape: per_sample_randn(generators, shape[1:]))


def distilled_guidance(cfg) -> float | None:
    """The teacher CFG scale a run's objective distilled toward (``objective.guidance_scale``), None if it has none."""
    w = getattr(cfg.objective, "guidance_scale", None)
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None


def student_sampler(run_dir: str | Path, device="cpu", use_ema: bool = True, model: str | None = None,
                    checkpoint: str | Path | None = None) -> ModelSampler:
    from ..training.run import load_student

    loaded = load_student(run_dir, device, use_ema, checkpoint)
    teacher, view, times, info = loaded.teacher, loaded.view, loaded.times, loaded.info
    teacher.denoiser.to(device)

    @torch.no_grad()
    def generate(seeds: Sequence[int], conds: Conditions) -> Tensor:
        cond, _ = cond_dicts(teacher.conditioner, conds, device)
        gens = sample_generators(seeds)
        noise = per_sample_randn(gens, teacher.sample_shape).to(device)
        return finish_samples(teacher, seeded_few_step_sample(view, noise, cond, times, gens))

    info["times"] = times
    info["distilled_guidance_scale"] = distilled_guidance(loaded.cfg)
    return ModelSampler(model or str(run_dir), "student", "few-step", len(times), None, generate,
                        [inner_model(view.module)], teacher.num_classes, teacher_prompts(teacher), info)


def hybrid_sampler(run_dir: str | Path, teacher_steps: int = 1, schedule_steps: int = 4, guidance_scale: float | None = None,
                   device="cpu", use_ema: bool = True, model: str | None = None) -> ModelSampler:
    """The run's student after the teacher's first k of N steps (``evaluation/hybrid.py``)."""
    from .hybrid import hybrid_sampler as build

    return build(run_dir, teacher_steps, schedule_steps, guidance_scale, device, use_ema, model)


# ------------------------------------------------------------------------------------ pipelines


def _missing_components(folder: Path) -> dict:
    """Components named in model_index.json but not saved: the offline MiniLM text encoder if it fits."""
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or (folder / name).is_dir():
            continue
        if name == "text_encoder" and entry[1] == "BertModel":
            from ..teachers import text_encoder_minilm

            out[name] = text_encoder_minilm()[0]
        elif name in ("safety_checker", "feature_extractor", "image_encoder"):
            out[name] = None
    return out


def load_pipeline(folder: str | Path, device="cpu", trust_remote_code: bool = False):
    """``DiffusionPipeline.from_pretrained(folder)``; one-line errors."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust_remote_code, **_missing_components(folder))
    except (ValueError, OSError, TypeError, AttributeError) as e:
        hint = "" if trust_remote_code else " (a folder with its own pipeline .py needs --trust-remote-code)"
        raise StepdistillError(f"cannot load pipeline {str(folder)!r}: {str(e).splitlines()[0]}{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _images_to_tensor(images) -> Tensor:
    """Pipeline output (pt [B, C, H, W] / np [B, H, W, C] in [0, 1] / PIL list) -> [B, C, H, W] in [-1, 1]."""
    import numpy as np

    if isinstance(images, list):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        images = images[..., None] if images.ndim == 3 else images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return (images.float() * 2 - 1).clamp(-1, 1)


def pipeline_call_kwargs(params, seeds: Sequence[int], conds: Conditions, steps: int, guidance_scale,
                         export_call: dict | None = None) -> dict:
    """Keyword arguments for a pipeline ``__call__`` with these parameters.

    ``export_call``: the export's ``call_kwargs`` for this step count (``stepdistill_export.json``: e.g.
    ``sigmas``, ``guidance_scale=1``, ``height``/``width``, the T5 length); they win over the defaults and
    over ``--guidance-scale``, since only they replay the trained student.
    """
    kwargs = {"num_inference_steps": steps, "generator": sample_generators(seeds)}
    if "output_type" in params:
        kwargs["output_type"] = "pt"
    if conds.prompts is not None and "prompt" in params:
        kwargs["prompt"] = list(conds.prompts)
    elif conds.labels is not None:
        name = next((n for n in ("class_labels", "class_label", "labels") if n in params), None)
        if name is None:
            raise StepdistillError("this pipeline takes no class labels (no class_labels argument)")
        kwargs[name] = conds.labels
    elif "batch_size" in params:
        kwargs["batch_size"] = len(seeds)
    if guidance_scale is not None and "guidance_scale" in params:
        kwargs["guidance_scale"] = guidance_scale
    return kwargs | dict(export_call or {})


def export_meta(folder: str | Path) -> dict:
    """``stepdistill_export.json`` of an exported folder ({} for other pipeline folders)."""
    path = Path(folder) / "stepdistill_export.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise StepdistillError(f"cannot read {path}: {e}") from None


def export_steps(folder: str | Path, steps: Sequence[int]) -> list[int]:
    """The requested step counts an exported folder replays its student at (all of them for other folders).

    An export samples the trained student only at its exported step counts (``steps`` in
    stepdistill_export.json; the call arguments are written per count); others are left out, and a
    request with none of them is a one-line error.
    """
    exported = export_meta(folder).get("steps")
    if not exported:
        return list(steps)
    kept = [n for n in steps if n in exported]
    if not kept:
        raise StepdistillError(f"exported pipeline {str(folder)!r} replays its student at --steps {' '.join(map(str, exported))} "
                               f"only; --steps {' '.join(map(str, steps))} asks for none of them")
    return kept


def pipeline_sampler(folder: str | Path, steps: int, guidance_scale: float | None = None, device="cpu",
                     trust_remote_code: bool = False, num_classes: int = 0, prompts=None, model: str | None = None) -> ModelSampler:
    """An exported pipeline folder at ``steps`` steps (see the module docstring).

    Prompt pipelines get ``prompts`` (the user's list); without it, the digit captions when the
    export's teacher is a digits-caption teacher, else ``TEXT`` (``use_prompts`` then asks for --prompts).
    """
    pipe = load_pipeline(folder, device, trust_remote_code)
    params = inspect.signature(pipe.__call__).parameters
    meta = export_meta(folder)
    num_classes = num_classes or int(meta.get("num_classes") or 0)
    if prompts is None and "prompt" in params:
        prompts = meta.get("prompts") or (DIGITS if digits_captions_teacher(meta.get("teacher")) else TEXT)
    export_call = (meta.get("call_kwargs") or {}).get(str(steps))
    if meta.get("call_kwargs") and export_call is None:
        raise StepdistillError(f"exported pipeline {str(folder)!r} has call arguments for steps "
                               f"{', '.join(meta['call_kwargs'])} only, not {steps}")
    if export_call and "guidance_scale" in export_call:
        guidance_scale = export_call["guidance_scale"]

    stochastic = bool(meta.get("stochastic_sampling")) and steps > 1

    @torch.no_grad()
    def generate(seeds: Sequence[int], conds: Conditions) -> Tensor:
        if stochastic:  # the scheduler's step noise comes from the global RNG: seeded per batch, not per sample
            torch.manual_seed(int(seeds[0]))
        out = pipe(**pipeline_call_kwargs(params, seeds, conds, steps, guidance_scale, export_call))
        return _images_to_tensor(out.images if hasattr(out, "images") else out[0])

    networks = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None)) if isinstance(m, nn.Module)]
    info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__ if hasattr(pipe, "scheduler") else None,
            "folder": str(folder), "teacher": meta.get("teacher"), "training": meta.get("training"),
            "export_call_kwargs": export_call,
            "step_noise": "global torch RNG seeded with the batch's first seed (depends on the batch size)" if stochastic else None}
    return ModelSampler(model or str(folder), "pipeline", info["scheduler"] or "pipeline", steps, guidance_scale, generate,
                        networks, num_classes, prompts if "prompt" in params else None, info)
