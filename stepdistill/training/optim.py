"""Optimizers, LR schedules, the student EMA and ``accelerate.prepare`` for the trained networks."""

from __future__ import annotations

import math
import os

import torch

from ..config import RunConfig
from ..contract import StepdistillError
from .checkpoint import trim_lora_weights
from .reporting import tracker_names
from .run import Trainable

LR_SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts", "polynomial")  # diffusers.optimization names


def make_optimizer(tr: Trainable, total_updates: int):
    """AdamW plus ``diffusers.optimization.get_scheduler`` (linear warm-up from 0, stepped once per update)."""
    from diffusers.optimization import get_scheduler

    cfg = tr.cfg
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise StepdistillError(f"{tr.name}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    opt = torch.optim.AdamW(tr.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warm = max(0, cfg.warmup_steps)
    name = "constant_with_warmup" if (cfg.lr_schedule == "constant" and warm) else cfg.lr_schedule
    return opt, get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=max(1, total_updates))


def fsdp_kwargs(cfg: RunConfig) -> dict:
    """FSDP2 for the trained full networks (``train.distributed=fsdp``); the teacher stays unsharded.

    Limits: LoRA views on one shared base cannot be sharded per network (the base belongs to
    all three), so fsdp needs full-copy networks; each trained network is wrapped on its own.
    DeepSpeed is not offered: one engine per model, and DMD-style runs train two.
    """
    mode = cfg.train.distributed
    if mode not in ("ddp", "fsdp"):
        raise StepdistillError(f"train.distributed must be ddp or fsdp, got {mode!r}")
    if mode == "ddp":
        return {}
    if "lora" in (cfg.student.init, cfg.fake_score.init):
        raise StepdistillError("train.distributed=fsdp needs full-copy networks (student.init=copy, fake_score.init=copy); "
                               "LoRA adapters share the teacher's base: use ddp")
    from accelerate.utils import FullyShardedDataParallelPlugin

    return {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                          state_dict_type="SHARDED_STATE_DICT")}


def prepare(accelerator, trainables: dict[str, Trainable], objective, rounds: int) -> tuple[list[str], set[int]]:
    """Optimizers per network; prepare each owning module once (the teacher never).

    Returns the module names in accelerate's order (``model``, ``model_1``, ...; LoRA views of one
    base share a name ``student+fake_score``) and the indices of LoRA bases, whose checkpoints keep
    only the adapters (the base is the frozen teacher, reloaded on resume).
    """
    modules, seen = [], {}
    for tr in trainables.values():
        per_round = sum(c for p, c in objective.phases.items() if tr.name in objective.phase_updates(p))
        tr.optimizer, tr.scheduler = make_optimizer(tr, per_round * rounds)
        if id(tr.module) not in seen:
            seen[id(tr.module)] = len(modules)
            modules.append(tr.module)
    opts = [tr.optimizer for tr in trainables.values()]
    scheds = [tr.scheduler for tr in trainables.values()]
    prepared = accelerator.prepare(*modules, *opts, *scheds)
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    pm, po, ps = prepared[: len(modules)], prepared[len(modules): len(modules) + len(opts)], prepared[len(modules) + len(opts):]
    for tr, opt, sch in zip(trainables.values(), po, ps):
        tr.module, tr.optimizer, tr.scheduler = pm[seen[id(tr.module)]], opt, sch
    owners = {}
    for tr in trainables.values():
        owners.setdefault(id(tr.module), "+".join(n for n, t in trainables.items() if t.module is tr.module))
    names = list(owners.values())
    lora = {i for i, group in enumerate(names) if any(trainables[n].adapter for n in group.split("+"))}
    trim_lora_weights(accelerator, lora)
    return names, lora


def make_ema(cfg: RunConfig, trainables: dict[str, Trainable], log=print):
    """diffusers' ``EMAModel`` over the student, or None. With ``student.ema_rampup`` r > 0 it ramps as
    SiD's EMA (half-life min(H, r x images seen)): EMAModel's warm-up decay 1 - (1 + n/g)^-1 with power 1
    and inv_gamma g = ln 2 / r has half-life ~ r n updates, i.e. r x the images seen, whatever the
    batch; ``ema_decay`` caps it (H). r = 0: EMAModel's plain (1+n)/(10+n) warm-up up to ema_decay."""
    sc = cfg.student
    if not sc.ema_decay or "student" not in trainables:
        return None
    from diffusers.training_utils import EMAModel

    ramp = dict(use_ema_warmup=True, power=1.0, inv_gamma=math.log(2) / sc.ema_rampup) if sc.ema_rampup > 0 else \
        dict(use_ema_warmup=False)
    log(f"student EMA (evaluated and exported): decay up to {sc.ema_decay}"
          + (f", SiD ramp: half-life {sc.ema_rampup} x images seen" if sc.ema_rampup > 0 else ""))
    return EMAModel(trainables["student"].params, decay=sc.ema_decay, foreach=False, **ramp)


def make_accelerator(cfg: RunConfig, run_dir):
    """accelerate's Accelerator for the run (a fresh process-wide state outside a distributed launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    tc = cfg.train
    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise StepdistillError(f"train.mixed_precision must be no, bf16 or fp16, got {tc.mixed_precision!r}")
    if tc.mixed_precision == "fp16" and (tc.cpu or not torch.cuda.is_available()):
        raise StepdistillError("train.mixed_precision=fp16 needs a CUDA device (on CPU it would silently train in fp32); "
                               "use train.mixed_precision=bf16 or no")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # a second run in one process may use another precision
        AcceleratorState._reset_state(reset_partial_state=True)
    # LoRA views share one DDP-wrapped base, and each phase uses only its own adapter
    ddp = DistributedDataParallelKwargs(find_unused_parameters="lora" in (cfg.student.init, cfg.fake_score.init))
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu or not torch.cuda.is_available(),
                              kwargs_handlers=[ddp], log_with=tracker_names(tc.report_to) or None, project_dir=str(run_dir),
                              **fsdp_kwargs(cfg))
    if tc.distributed == "fsdp" and "FSDP" not in str(accelerator.distributed_type):
        accelerator.print(f"train.distributed=fsdp: accelerate runs {accelerator.distributed_type.value} here (FSDP needs "
                          "CUDA devices); training unsharded")
    return accelerator
