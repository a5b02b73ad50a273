"""Student and fake score built from a teacher: full copies, or LoRA on the shared frozen base.

With LoRA, teacher, student and fake score are three *views* of one module: the base with
adapters off is the teacher, the ``student`` adapter makes the student, the ``fake_score``
adapter the fake score. One set of base weights serves all three (SwiftBrush / LCM-LoRA /
DMD2-LoRA memory lever).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import Cond, NoiseSchedule, StepdistillError, add_noise, as_time, expand_like

from ..adapters.families import LORA_TARGETS  # noqa: E402  (the default set; families may name their own)


class MLPDenoiser(nn.Module):
    """Small MLP x0-denoiser for low-dimensional data, with EDM-style preconditioning.

    x0_hat = c_skip x_t + c_out F(c_in x_t, t, label), with c_in = 1/sqrt(a^2 sd^2 + s^2),
    c_skip = a sd^2 c_in^2, c_out = s sd c_in (Karras et al. 2022, Eq. 7 in VP form).
    """

    def __init__(self, shape: Sequence[int], schedule: NoiseSchedule, hidden: int = 128, depth: int = 3,
                 num_classes: int = 0, sigma_data: float = 1.0, fourier: int = 8):
        super().__init__()
        self.shape, self.schedule, self.sigma_data = tuple(shape), schedule, sigma_data
        dim = math.prod(self.shape)
        self.register_buffer("freqs", torch.arange(1, fourier + 1).float() * math.pi)
        layers, width = [], dim + 2 * fourier
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers[:-1])  # last activation applied after the label add
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None  # +1: null label
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        t = as_time(t, x_t)
        x = x_t.reshape(len(x_t), -1).float()  # [B, D]
        a, s, sd = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None], self.sigma_data
        c_in = 1 / (a**2 * sd**2 + s**2).sqrt()
        feats = torch.cat([c_in * x, (t[:, None] * self.freqs).sin(), (t[:, None] * self.freqs).cos()], -1)
        h = self.body(feats)  # [B, hidden]
        labels = None if cond is None else cond.get("class_labels")
        if self.label is not None and labels is not None:
            h = h + self.label(labels.long())
        x0 = a * sd**2 * c_in**2 * x + s * sd * c_in * self.out(F.silu(h))  # [B, D]
        return x0.reshape(x_t.shape).to(x_t.dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP/FSDP/compile wrapper."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def inner_model(module: nn.Module) -> nn.Module:
    """The network that owns the weights: unwrap DDP/FSDP/compile, then the contract adapter (``.model``)."""
    module = unwrap(module)
    return getattr(module, "model", module) if hasattr(module, "schedule") else module


class Net:
    """A named denoiser view: calls ``module`` (possibly accelerate-prepared) with one LoRA
    adapter active, all adapters off (``adapter=""``: the shared base = the teacher), or no
    adapter handling at all (``adapter=None``: a full network)."""

    def __init__(self, module: nn.Module, schedule: NoiseSchedule, adapter: str | None = None):
        self.module, self.schedule, self.adapter = module, schedule, adapter

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if self.adapter is not None:
            set_active_adapter(unwrap(self.module), self.adapter or None)
        return self.module(x_t, t, cond)


def tuner_layers(model: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    cache = model.__dict__.get("_stepdistill_tuner_layers")
    if cache is None:
        cache = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model.__dict__["_stepdistill_tuner_layers"] = cache
    return cache


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Route every LoRA layer through adapter ``name`` (None: base weights only).

    Unlike peft's ``set_adapter`` this leaves ``requires_grad`` alone: which parameters train is
    the trainer's decision, per phase.
    """
    for layer in tuner_layers(model):
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]


def default_lora_targets(model: nn.Module, candidates: Sequence[str] = LORA_TARGETS) -> list[str]:
    """The candidate targets (a family's ``lora_targets``) present in the model, else every Linear layer (the toy MLP)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # layers already wrapped by another adapter (student + fake score on one base) count as their base layer
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, BaseTunerLayer))]
    found = sorted({t for t in candidates if any(n == t or n.endswith("." + t) for n in names)})
    inner = (".base_layer", ".lora_A.", ".lora_B.")  # peft's own submodules are never targets
    return found or [n for n, m in model.named_modules()
                     if isinstance(m, (nn.Linear, BaseTunerLayer)) and not any(s in n + "." for s in inner)]


def add_lora(model: nn.Module, name: str, rank: int, alpha: float, targets: Sequence[str] | None = None) -> list[nn.Parameter]:
    """Inject a LoRA adapter (peft) named ``name``; returns its parameters (B = 0: starts at the base)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets or default_lora_targets(model))
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        with warnings.catch_warnings():  # "multiple adapters in the model" is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model, adapter_name=name)
    except ValueError as e:
        raise StepdistillError(f"cannot add LoRA adapter {name!r}: {str(e).splitlines()[0]}") from None
    for p, g in grads.items():  # peft freezes everything else; keep the caller's flags
        p.requires_grad_(g)
    model.__dict__.pop("_stepdistill_tuner_layers", None)
    params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def full_copy(module: nn.Module) -> nn.Module:
    """A trainable fp32 copy (master weights) of a teacher module, in eval mode.

    Eval mode on purpose: distillation wants the network's deterministic function. In train
    mode diffusers' ``LabelEmbedding`` (DiT, PixArt) replaces 10% of the class labels by the
    null class, which would silently train a class-conditional student on wrong labels.
    Gradients do not depend on the mode (diffusers' checkpointing keys on grad mode).
    """
    clone = copy.deepcopy(module).float()
    clone.requires_grad_(True)
    return clone.eval()


def compressed_copy(denoiser: nn.Module, plan: str, log=print) -> nn.Module:
    """A trainable fp32 student with fewer blocks than the teacher's diffusers UNet, from its remaining
    weights (``adapters/compress.py``), behind the same contract adapter; in eval mode like ``full_copy``."""
    from ..adapters.compress import compress_model
    from ..adapters.denoiser import DiffusersDenoiser

    model = getattr(denoiser, "model", None)
    if not isinstance(denoiser, DiffusersDenoiser) or not hasattr(model, "config"):
        raise StepdistillError(f"student.init=compress (plan {plan!r}) needs a diffusers UNet teacher; "
                               f"this one is a {type(model or denoiser).__name__}")
    student = DiffusersDenoiser(compress_model(model, plan, log), denoiser.schedule, denoiser.prediction_type,
                                denoiser.record)
    student.requires_grad_(True)
    return student.eval()


def fit_to_teacher(
    net: nn.Module,
    teacher: Callable,
    sample_data: Callable[[int, torch.Generator, Cond], Tensor],
    conditioner: Callable,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    p_uncond: float = 0.1,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
) -> float:
    """Initialise a network for a teacher without weights: regress net(x_t, t) onto teacher(x_t, t).

    x0 comes from the teacher's data distribution, t ~ U[0, 1]; with prob ``p_uncond`` the
    null condition is used so the copy also learns the unconditional branch for CFG.
    Returns the final loss (mean over the last 10% of steps).
    """
    if steps <= 0:
        return float("nan")
    g = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        cond, null = conditioner(batch_size, g)
        x0 = sample_data(batch_size, g, cond)
        if null is not None and p_uncond > 0:
            drop = torch.rand(batch_size, generator=g) < p_uncond
            cond = {k: torch.where(expand_like(drop, v), null[k], v) for k, v in cond.items()}
        t = torch.rand(batch_size, generator=g)
        x_t = add_noise(net.schedule, x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            target = teacher(x_t, t, cond)
        loss = F.mse_loss(net(x_t, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def merged_model(model: nn.Module, adapter: str | None) -> nn.Module:
    """A plain diffusers model with LoRA adapter ``adapter`` merged into the base weights (peft's own merge)."""
    if adapter is None:
        return copy.deepcopy(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(model)
    for layer in work.modules():
        if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {}):
            layer.merge(adapter_names=[adapter])
    state = {key.replace(".base_layer.", "."): value for key, value in work.state_dict().items() if "lora_" not in key}
    plain = type(model).from_config(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StepdistillError(f"merging the LoRA student failed: {len(missing)} missing, {len(unexpected)} unexpected keys")
    return plain.to(next(model.parameters()).dtype)
