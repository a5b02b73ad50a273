"""The Run: a config turned into built parts, and a run folder turned back into a student.

``build_run(cfg)`` loads the teacher (with the conditions ``data.conditions`` names), builds
the trainable networks (full copies or LoRA on the teacher's shared base) and the objective's
own networks, and fixes the student's times. ``load_student(run_dir)`` is the ONE loader of a
finished run: export, evaluation and the quickstart stand on it, never on the trainer. Only
``checkpoint.py`` knows the checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import NetworkConfig, RunConfig, load_config
from ..contract import StepdistillError
from ..objectives.base import Nets
from ..teachers import Teacher, load_teacher
from .networks import MLPDenoiser, Net, add_lora, compressed_copy, fit_to_teacher, full_copy, inner_model


@dataclass
class Trainable:
    """A network the objective trains: the module that owns its weights and its parameters."""

    name: str
    module: nn.Module  # for LoRA, the shared base (also owned by the other adapter)
    params: list[nn.Parameter]
    cfg: NetworkConfig
    adapter: str | None = None  # LoRA adapter name, None for a full network
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)


@dataclass
class Run:
    """Everything built from one config: the teacher, what trains, and the student's times."""

    cfg: RunConfig
    teacher: Teacher
    trainables: dict[str, Trainable]
    times: tuple[float, ...]

    def views(self) -> Nets:
        """Denoiser views over the (possibly accelerate-prepared) modules."""
        nets = make_views(self.teacher, self.trainables, self.times)
        nets.extra = {n: tr.module for n, tr in self.trainables.items() if n not in ("student", "fake_score")}
        return nets


# ------------------------------------------------------------------------------------ teacher


def teacher_from_config(cfg: RunConfig, device="cpu") -> Teacher:
    """The teacher with the conditions ``data.conditions`` asks for (auto, class_labels, none, prompts:<file>)."""
    from ..conditioning import Unconditional, read_prompt_file

    spec = cfg.data.conditions
    prompts = None
    if spec.startswith("prompts:"):
        prompts = read_prompt_file(spec.removeprefix("prompts:"))
    elif spec not in ("auto", "class_labels", "none"):
        raise StepdistillError(f"data.conditions must be auto, class_labels, none or prompts:<file>, got {spec!r}")
    teacher = load_teacher(cfg.teacher.name, cfg.teacher.dtype, prompts, getattr(cfg.teacher, "null_class", None))
    if spec == "none":
        teacher.conditioner = Unconditional()
    elif spec == "class_labels" and not teacher.num_classes:
        raise StepdistillError(f"data.conditions=class_labels, but teacher {teacher.name!r} is not class-conditional")
    if not cfg.teacher.offload:
        teacher.denoiser.to(device)
    if hasattr(teacher.conditioner, "device"):
        teacher.conditioner.device = device
    return teacher


def times_of_sigmas(schedule, sigmas, log=print) -> list[float]:
    """Times t in (0, 1] where the teacher's schedule has sigma(t)/alpha(t) = each of ``sigmas`` (EDM units),
    by bisection (the ratio rises with t on every schedule); a level above the schedule's largest gives t = 1."""
    def ratio(t: float) -> float:
        tt = torch.tensor([t])
        return float(schedule.sigma(tt) / schedule.alpha(tt).clamp_min(1e-12))

    top = ratio(1.0)
    out = []
    for target in sigmas:
        if target >= top:
            out.append(1.0)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
        out.append(hi)
    last = getattr(schedule, "num_train_timesteps", 0) - 1
    if getattr(schedule, "kind", "") == "vp" and last > 0:  # the nearest integer step (student_times floors)
        out = [max(1, round(t * last)) / last for t in out]
    capped = [s for s, t in zip(sigmas, out) if t == 1.0 and s > top]
    msg = f"student.sigmas {list(sigmas)} -> times {[round(t, 5) for t in out]} on this teacher's schedule"
    log(msg + (f" (its largest sigma/alpha is {top:.3g}: {capped} start from t = 1)" if capped else ""))
    return out


def student_times(cfg: RunConfig, teacher: Teacher, log=print) -> tuple[float, ...]:
    """The student's times, checked; VP students snap to the teacher's integer timesteps (floor, so
    [1, .75, .5, .25] become LCMScheduler's grid [999, 749, 499, 249] and export replays them)."""
    import math

    times = [float(t) for t in cfg.student.times]
    if cfg.student.sigmas:
        times = times_of_sigmas(teacher.denoiser.schedule, cfg.student.sigmas, log)
    if not times or any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise StepdistillError(f"student.times must be strictly decreasing values in (0, 1], got {times}")
    schedule = teacher.denoiser.schedule
    if getattr(schedule, "kind", "") == "vp" and hasattr(schedule, "num_train_timesteps"):
        last = schedule.num_train_timesteps - 1
        steps = [math.floor(t * last + 1e-6) for t in times]
        if len(set(steps)) < len(steps):
            raise StepdistillError(f"student.times {times} collide on the teacher's {last + 1} integer timesteps")
        snapped = [s / last for s in steps]
        if any(abs(a - b) > 1e-9 for a, b in zip(times, snapped)):
            log(f"student times {times} snapped to the teacher's integer timesteps: {steps} (t = {[round(t, 6) for t in snapped]})")
        times = snapped
    return tuple(times)


# ----------------------------------------------------------------------------------- networks


def _fit_network(teacher: Teacher, cfg: NetworkConfig, seed: int, log, fit: bool = True) -> nn.Module:
    net = MLPDenoiser(teacher.sample_shape, teacher.denoiser.schedule, cfg.mlp_hidden, cfg.mlp_depth, teacher.num_classes)
    if not fit:  # resuming: the weights come from the checkpoint
        return net
    g = torch.Generator().manual_seed(seed)
    loss = fit_to_teacher(net, teacher.denoiser, teacher.sample_data, teacher.conditioner, cfg.fit_steps,
                          lr=cfg.fit_lr, generator=g)
    log(f"fitted an MLP denoiser to the teacher: {cfg.fit_steps} steps, final x0-MSE {loss:.4g}")
    return net


def _check_init(teacher: Teacher, name: str, cfg: NetworkConfig) -> None:
    is_analytic = teacher.sample_data is not None
    if cfg.init not in ("copy", "lora", "fit", "compress"):
        raise StepdistillError(f"{name}.init must be copy, lora, fit or compress, got {cfg.init!r}")
    if is_analytic and cfg.init != "fit":
        raise StepdistillError(f"{name}.init={cfg.init}: the analytic teacher has no weights to copy; use {name}.init=fit")
    if not is_analytic and cfg.init == "fit":
        raise StepdistillError(f"{name}.init=fit is for analytic teachers (no weights); {teacher.name} has weights: "
                               f"use {name}.init=copy or lora")


def _lora_targets(teacher: Teacher, cfg: NetworkConfig):
    if cfg.lora_targets:
        return cfg.lora_targets
    record = getattr(teacher.denoiser, "record", None)
    if record is None:
        return None
    from .networks import default_lora_targets

    return default_lora_targets(teacher.denoiser, record.lora_targets)


def build_networks(teacher: Teacher, student_cfg, fake_cfg: NetworkConfig | None, seed: int, log=print, fit: bool = True):
    """Trainables for the student and (optionally) the fake score; ``fit=False`` skips the
    denoising fit of init=fit networks (their weights are about to be loaded)."""
    base = teacher.denoiser
    wanted = [(n, c) for n, c in (("student", student_cfg), ("fake_score", fake_cfg)) if c is not None]
    for name, cfg in wanted:
        _check_init(teacher, name, cfg)
    trainables: dict[str, Trainable] = {}
    fitted = None
    for name, cfg in wanted:
        if cfg.init == "lora":
            params = add_lora(base, name, cfg.lora_rank, cfg.lora_alpha, _lora_targets(teacher, cfg))
            trainables[name] = Trainable(name, base, params, cfg, adapter=name)
            continue
        if cfg.init == "fit":
            fitted = fitted or _fit_network(teacher, cfg, seed, log, fit)
        module = compressed_copy(base, cfg.compress, log) if cfg.init == "compress" else \
            full_copy(fitted if cfg.init == "fit" else base)
        trainables[name] = Trainable(name, module, list(module.parameters()), cfg)
    base.requires_grad_(False)  # the teacher's own weights never train
    for tr in trainables.values():
        for p in tr.params:
            p.requires_grad_(True)
    return trainables


def make_views(teacher: Teacher, trainables: dict[str, Trainable], times) -> Nets:
    """Callable denoiser views over the (prepared) modules."""
    schedule = teacher.denoiser.schedule
    uses_lora = any(t.adapter for t in trainables.values())
    shared = next((t.module for t in trainables.values() if t.adapter), teacher.denoiser)
    teacher_view = Net(shared, schedule, adapter="") if uses_lora else teacher.denoiser

    def view(name):
        tr = trainables.get(name)
        return None if tr is None else Net(tr.module, schedule, adapter=tr.adapter)

    return Nets(teacher=teacher_view, student=view("student"), student_times=tuple(times), fake_score=view("fake_score"))


def add_objective_networks(cfg: RunConfig, teacher: Teacher, trainables: dict[str, Trainable], device) -> None:
    """Networks the objective builds itself (discriminator heads), trained with ``cfg.discriminator``."""
    build = getattr(cfg.objective, "extra_networks", None)
    if build is None:
        return
    for name, module in build(teacher).items():
        if name in trainables or name not in cfg.objective.trains:
            raise StepdistillError(f"objective network {name!r} clashes with another network or is missing from its trains")
        module = module.to(device).float().requires_grad_(True)
        trainables[name] = Trainable(name, module, list(module.parameters()), cfg.discriminator)


def build_run(cfg: RunConfig, device="cpu", log=print, fit: bool = True) -> Run:
    """Teacher, trainables (student, fake score, objective networks) and student times from a config."""
    from ..adapters.families.class_conditional import resolve_guidance

    teacher = teacher_from_config(cfg, device)
    # CFG on a teacher without a null class: the recipe's is turned off (one line), the command line's is an error
    resolve_guidance(teacher, cfg.objective, getattr(cfg, "explicit", frozenset()), log)
    fake_cfg = cfg.fake_score if "fake_score" in cfg.objective.trains else None
    trainables = build_networks(teacher, cfg.student, fake_cfg, cfg.train.seed, log, fit=fit)
    add_objective_networks(cfg, teacher, trainables, device)
    return Run(cfg, teacher, trainables, student_times(cfg, teacher, log))


# ---------------------------------------------------------------------------- finished runs


@dataclass
class LoadedStudent:
    """A finished run's student, ready to sample: the view, its times, and where it came from."""

    teacher: Teacher
    view: Net  # the student denoiser (EMA weights when asked and present)
    times: list[float]
    info: dict
    cfg: RunConfig
    trainable: Trainable

    def diffusers_model(self) -> nn.Module:
        """A plain diffusers network with the student's weights (LoRA merged)."""
        from .networks import merged_model

        return merged_model(inner_model(self.trainable.module), self.trainable.adapter)

    def lora_state(self) -> dict | None:
        """peft-format adapter weights (``<module>.lora_A.weight``), or None for a full network."""
        tr = self.trainable
        if tr.adapter is None:
            return None
        tag = f".{tr.adapter}."
        state = {k.replace(tag, "."): v.detach().float().cpu().contiguous()
                 for k, v in inner_model(tr.module).state_dict().items() if "lora_" in k and tag in k}
        if not state:
            raise StepdistillError(f"the student has no LoRA weights under adapter {tr.adapter!r}")
        return state


def load_student(run_dir: str | Path, device="cpu", use_ema: bool = True, checkpoint: str | Path | None = None) -> LoadedStudent:
    """The student of a run folder (its config and newest complete checkpoint, or ``checkpoint``: a
    folder under its ``checkpoints/``, e.g. for a convergence curve), ready to sample."""
    from .checkpoint import checkpoint_dirs, latest_checkpoint, read_student_weights
    from .rundir import training_summary

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise StepdistillError(f"{run_dir} is not a run directory (no config.yaml); give the --output-dir of `stepdistill train`")
    if checkpoint is not None:
        ckpt = run_dir / "checkpoints" / Path(checkpoint).name
        if ckpt not in checkpoint_dirs(run_dir):
            raise StepdistillError(f"{ckpt} is not a complete checkpoint of {run_dir}")
    else:
        ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise StepdistillError(f"{run_dir} has no complete checkpoint under checkpoints/")
    cfg = load_config(str(run_dir / "config.yaml"))
    teacher = teacher_from_config(cfg, device)
    student = build_networks(teacher, cfg.student, None, cfg.train.seed, log=lambda _m: None, fit=False)["student"]
    own = student.module.state_dict()
    needed = [k for k in own if (student.adapter is None or (".student." in k and "lora_" in k))]
    state, saved, ema = read_student_weights(ckpt, needed)
    student.module.load_state_dict({k: v for k, v in saved.items() if k in own}, strict=False)
    ema_used = bool(use_ema and ema)
    if ema_used:
        for p, e in zip(student.params, ema):
            p.data.copy_(e)
    student.module.to(device).eval().requires_grad_(False)
    view = Net(student.module, teacher.denoiser.schedule, adapter=student.adapter)
    info = {"checkpoint": str(ckpt), "step": state.get("step"), "ema": ema_used, "objective": state.get("objective", {}),
            "student_init": cfg.student.init, "teacher": cfg.teacher.name, "training": training_summary(run_dir, state.get("step")),
            "rounds": state.get("step")}
    return LoadedStudent(teacher, view, list(student_times(cfg, teacher, log=lambda _m: None)), info, cfg, student)


class swapped:
    """A reusable context that copies ``values`` (e.g. EMA weights) into ``params`` and restores them after."""

    def __init__(self, params, values):
        self.params, self.values = params, values

    def __enter__(self):
        self.backup = [p.detach().clone() for p in self.params]
        for p, v in zip(self.params, self.values):
            p.data.copy_(v)

    def __exit__(self, *exc):
        for p, b in zip(self.params, self.backup):
            p.data.copy_(b)
        return False


__all__ = ["Run", "Trainable", "LoadedStudent", "build_run", "build_networks", "make_views", "load_student",
           "teacher_from_config", "student_times"]
