"""``stepdistill plan RECIPE``: how much memory a run needs, before anything trains.

Nothing is loaded: the teacher's network is built from its ``config.json`` on the ``meta``
device (no weights, no compute), which gives exact parameter counts and, through one meta
forward pass with hooks, the size of every leaf module's output -- the activations a backward
pass keeps. The estimate per device is

    teacher weights            P_teacher x bytes(teacher.dtype)        (frozen, shared by LoRA views)
    each full trained network  16 bytes/param: fp32 master weights 4 + grads 4 + AdamW 8
    each LoRA trained network  16 bytes per adapter param (the base is the teacher's)
    init=compress network      16 bytes/param of the smaller network (its own, smaller activations too)
    student EMA                4 bytes/param of the student's trained params
    activations                per phase: sum of leaf outputs of every network whose graph the
                               phase keeps, x batch x bytes(compute dtype); with gradient
                               checkpointing only the block inputs plus one block's internals

and the peak is the static part plus the largest phase. It ignores the CUDA context (~0.5-1
GiB), allocator fragmentation, transient no-grad forwards, text encoders/VAEs (kept outside
the trained graph) and objective heads (small), so treat it as a lower bound: leave 15-20%.
With FSDP (``--shards N``) the trained full networks' weights, grads and optimizer states
divide by N; DDP replicates everything on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import RunConfig
from .contract import StepdistillError

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "no": 4}
DEVICES = {  # usable memory in GiB of common accelerators
    "t4": 15, "l4": 22, "rtx3090": 24, "rtx4090": 24, "a10g": 22, "l40s": 45, "a100-40gb": 40, "a100-80gb": 80,
    "h100": 80, "h100-80gb": 80, "h200": 141, "mi300x": 192,
}


@dataclass
class NetEstimate:
    name: str
    params: int  # parameters of the network (the shared base for LoRA)
    trained: int  # parameters this run trains
    static_bytes: int  # weights + grads + optimizer (+ EMA) attributed to this network
    act_bytes_per_sample: int  # activations kept for backward, per sample, in the compute dtype


def device_memory(spec: str | None) -> float | None:
    """GiB from a device name (``a100-80gb``) or a size (``24``, ``24GB``, ``24GiB``)."""
    if not spec:
        return None
    key = spec.lower().strip()
    if key in DEVICES:
        return float(DEVICES[key])
    num = key.removesuffix("gib").removesuffix("gb").removesuffix("g")
    try:
        return float(num)
    except ValueError:
        raise StepdistillError(f"--device {spec!r}: give a size in GB or one of {', '.join(sorted(DEVICES))}") from None


def _meta_teacher(name: str) -> tuple[nn.Module, tuple[int, ...], dict]:
    """The teacher network on the meta device, its sample shape, and a cond factory's inputs."""
    from .adapters.families import read_json
    from .teachers import model_folder, resolve_teacher_folder

    folder = resolve_teacher_folder(name)
    _, model_path = model_folder(folder)
    config = read_json(model_path / "config.json")
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise StepdistillError(f"{model_path}/config.json names {config.get('_class_name')!r}, not a diffusers model class")
    with torch.device("meta"):
        model = cls.from_config(config)
    from .adapters import family_for_folder

    return model, family_for_folder(folder, config).sample_shape(config, None), config


def _meta_cond(model: nn.Module, config: dict, batch: int) -> dict:
    """Dummy conditioning inputs on meta for one forward, from the model's family record."""
    from .adapters import family_for_model

    with torch.device("meta"):
        return family_for_model(model).dummy_cond(config, batch)


def activation_elements(model: nn.Module, shape: tuple[int, ...], config: dict, checkpointing: bool) -> int:
    """Elements kept for backward per sample, from one meta forward.

    Autograd keeps, for the layers that matter (linear, conv, norms, activations), their *inputs*;
    residual sums and skip concatenations feed the next layer without being any layer's output.
    So every distinct tensor that enters or leaves a leaf module counts once (a tensor passed
    straight from one layer to the next is the same object, not two). With gradient
    checkpointing: the block boundaries (top-level block outputs) plus the largest single block's
    own tensors (recomputed one block at a time).
    """
    from .adapters import family_for_model

    leaves = {m for m in model.modules() if not list(m.children())}
    owner: dict[nn.Module, nn.Module] = {}
    blocks = [b for name, b in model.named_children() for b in (b if isinstance(b, nn.ModuleList) else [b])]
    for b in blocks:
        for m in b.modules():
            owner[m] = b
    seen: dict[int, tuple[torch.Tensor, nn.Module | None]] = {}  # id -> (tensor kept alive so ids stay unique, block)
    block_out: dict[nn.Module, int] = {}

    def note(t, mod):
        if torch.is_tensor(t) and t.is_floating_point() and id(t) not in seen:
            seen[id(t)] = (t, owner.get(mod))

    def flat(value):
        value = getattr(value, "sample", value)
        return value if isinstance(value, (tuple, list)) else (value,)

    def leaf_hook(mod, inputs, out):
        for t in (*inputs, *flat(out)):
            note(t, mod)

    def block_hook(mod, _inputs, out):
        block_out[mod] = block_out.get(mod, 0) + sum(t.numel() for t in flat(out) if torch.is_tensor(t))

    handles = [m.register_forward_hook(leaf_hook) for m in leaves]
    handles += [b.register_forward_hook(block_hook) for b in blocks]
    try:
        with torch.device("meta"), torch.no_grad():
            x = torch.zeros(1, *shape)
            family_for_model(model).call(model, x, torch.full((1,), 500.0), _meta_cond(model, config, 1))
    finally:
        for h in handles:
            h.remove()
    if not checkpointing:
        return sum(t.numel() for t, _ in seen.values())
    inner: dict[nn.Module, int] = {}
    for t, block in seen.values():
        if block is not None:
            inner[block] = inner.get(block, 0) + t.numel()
    outside = sum(t.numel() for t, block in seen.values() if block is None)
    return sum(block_out.values()) + outside + max(inner.values(), default=0)


def _meta_compressed(config: dict, plan: str) -> tuple[nn.Module, dict]:
    """The init=compress student on meta (``adapters/compress.py``): the smaller network and its config."""
    from .adapters.compress import compressed_config

    comp = compressed_config(config, plan)
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(comp.config)
    return model, dict(comp.config, _class_name=config["_class_name"]), comp.cuts


def lora_params(model: nn.Module, rank: int, targets: list[str] | None) -> int:
    """Adapter parameters peft would add: r (in + out) per Linear, r (in k^2 + out) per Conv2d."""
    from .training.networks import default_lora_targets

    targets = targets or default_lora_targets(model)
    total = 0
    for name, m in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * math.prod(m.kernel_size) // m.groups + m.out_channels)
    return total


def _phase_graphs(objective) -> dict[str, tuple[str, ...]]:
    """Networks whose activations each phase keeps for backward (objectives may declare ``graph_nets``)."""
    declared = getattr(objective, "graph_nets", None)
    phases = objective.phases
    if declared:
        return {p: tuple(declared.get(p, objective.phase_updates(p))) for p in phases}
    return {p: tuple(objective.phase_updates(p)) for p in phases}


def estimate(cfg: RunConfig, batch_size: int | None = None, precision: str | None = None, shards: int = 1,
             checkpointing: bool | None = None) -> dict:
    """The memory plan of ``cfg`` as a dict (per device, bytes and GiB)."""
    if cfg.teacher.name.startswith("analytic:"):
        raise StepdistillError("stepdistill plan needs a diffusers teacher (an embedded name or a folder); analytic teachers are tiny")
    batch = batch_size or cfg.train.batch_size
    precision = precision or cfg.train.mixed_precision
    precision = "fp32" if precision == "no" else precision
    if precision not in DTYPE_BYTES:
        raise StepdistillError(f"--precision must be one of no, fp32, bf16, fp16; got {precision!r}")
    checkpointing = cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    model, shape, config = _meta_teacher(cfg.teacher.name)
    p_teacher = sum(p.numel() for p in model.parameters())
    act = activation_elements(model, shape, config, checkpointing) * DTYPE_BYTES[precision]
    objective = cfg.objective
    nets = [NetEstimate("teacher", p_teacher, 0, p_teacher * DTYPE_BYTES[cfg.teacher.dtype], act)]
    compressed: dict[str, dict] = {}
    for name, ncfg in (("student", cfg.student), ("fake_score", cfg.fake_score)):
        if name not in objective.trains:
            continue
        params, net_act = p_teacher, act
        if ncfg.init == "lora":
            trained = lora_params(model, ncfg.lora_rank, ncfg.lora_targets or None)
            static = 16 * trained
        elif ncfg.init == "compress":  # a smaller network of its own: its params, its activations
            small, small_cfg, cuts = _meta_compressed(config, ncfg.compress)
            params = trained = sum(p.numel() for p in small.parameters())
            compressed[name] = {"plan": ncfg.compress, "cuts": list(cuts), "params": params, "teacher_params": p_teacher}
            net_act = activation_elements(small, shape, small_cfg, checkpointing) * DTYPE_BYTES[precision]
            static = 4 * trained + 12 * trained // max(1, shards)
        else:
            trained = p_teacher
            static = 4 * trained + 12 * trained // max(1, shards)
        if name == "student" and cfg.student.ema_decay > 0:
            static += 4 * trained
        nets.append(NetEstimate(name, params, trained, static, net_act))
    static_total = sum(n.static_bytes for n in nets)
    per = {n.name: n for n in nets}
    phases = {}
    for phase, graph in _phase_graphs(objective).items():
        phases[phase] = sum(per[n].act_bytes_per_sample for n in graph if n in per) * batch
        if cfg.student.feature_weight > 0 and "student" in objective.phase_updates(phase) and "student" in per:
            phases[phase] += per["student"].act_bytes_per_sample * batch  # the feature term's own student forward
    peak = static_total + max(phases.values(), default=0)
    return {
        "teacher": cfg.teacher.name, "teacher_class": type(model).__name__, "sample_shape": list(shape),
        "batch_size": batch, "precision": precision, "teacher_dtype": cfg.teacher.dtype, "shards": shards,
        "gradient_checkpointing": checkpointing,
        "networks": [{"name": n.name, "params": n.params, "trained_params": n.trained, "static_gib": n.static_bytes / GIB,
                      "activations_gib_per_sample": n.act_bytes_per_sample / GIB} for n in nets],
        "phases_activation_gib": {k: v / GIB for k, v in phases.items()},
        "static_gib": static_total / GIB, "peak_gib": peak / GIB, "compressed": compressed,
    }


def format_plan(plan: dict, device_gib: float | None = None) -> str:
    """A readable table plus the fit verdict."""
    lines = [f"teacher {plan['teacher']} ({plan['teacher_class']}, sample {tuple(plan['sample_shape'])}), batch "
             f"{plan['batch_size']} per device, compute {plan['precision']}, teacher weights {plan['teacher_dtype']}, "
             f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, shards {plan['shards']}",
             "", f"{'network':<12} {'params':>12} {'trained':>12} {'weights+grads+optim':>20} {'activations/sample':>19}"]
    for n in plan["networks"]:
        lines.append(f"{n['name']:<12} {n['params'] / 1e6:>11.1f}M {n['trained_params'] / 1e6:>11.2f}M "
                     f"{n['static_gib']:>16.2f} GiB {n['activations_gib_per_sample']:>15.3f} GiB")
    for name, c in plan.get("compressed", {}).items():
        lines.append(f"{name}: init=compress, plan {c['plan']} (cuts {'+'.join(c['cuts'])}): {c['params']:,} of the teacher's "
                     f"{c['teacher_params']:,} parameters ({100 * c['params'] / c['teacher_params']:.1f}%)")
    lines.append("")
    for phase, gib in plan["phases_activation_gib"].items():
        lines.append(f"phase {phase:<12} activations {gib:8.2f} GiB")
    lines.append(f"static {plan['static_gib']:.2f} GiB + largest phase = peak about {plan['peak_gib']:.2f} GiB per device "
                 "(a lower bound: add 15-20% and the CUDA context)")
    if device_gib:
        need = plan["peak_gib"] * 1.15 + 0.75
        verdict = "fits" if need <= device_gib else "WILL NOT FIT"
        lines.append(f"{verdict} a {device_gib:g} GiB device (needs about {need:.1f} GiB with margin)")
        if need > device_gib:
            lines.append("levers: student.init=lora / fake_score.init=lora, train.gradient_checkpointing=true, "
                         "teacher.dtype=bf16, train.mixed_precision=bf16, a smaller train.batch_size, FSDP over more devices")
    return "\n".join(lines)


__all__ = ["estimate", "format_plan", "device_memory", "activation_elements", "lora_params", "DEVICES"]
