"""Smaller students by block removal: a diffusers UNet with fewer blocks, initialised from the teacher.

BK-SDM (Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion",
arXiv 2305.15798) removes whole residual/attention blocks from the SD UNet and keeps the
remaining teacher weights as the student's initialisation. Here a *plan* is a set of cuts on the
network's diffusers config; the student is ``type(teacher).from_config(cut_config)`` (no
hand-written network) and every student tensor is copied from the teacher tensor it replaces,
by state-dict key mapping with shapes checked.

| cut      | what goes                                                                 | fits when                  |
|----------|---------------------------------------------------------------------------|----------------------------|
| ``layers`` | one resnet (+ attention) per down block: ``layers_per_block - 1``; up blocks then have one fewer too (diffusers gives them ``layers_per_block + 1``) | ``layers_per_block >= 2`` |
| ``mid``    | the mid block (``mid_block_type=None``)                                 | the network has one        |
| ``inner``  | the innermost down/up block pair (BK-SDM-Tiny's innermost stage)        | >= 2 levels, the two innermost of equal width (width-preserving) |

Named plans: ``bk-base`` = layers (BK-SDM-Base's block removal), ``bk-small`` = layers + mid,
``bk-tiny`` = layers + mid + inner; ``bk`` = every one of these cuts that fits the network (so
it works on the embedded digits teachers, whose ``layers_per_block`` is 1); or any ``+``-joined
list of cuts (``mid+inner``). A named cut that does not fit is a one-line error.

Which teacher layers the student keeps (skip-connection channels stay consistent):

* down block: resnets/attentions ``0 .. L'-1`` (resnet 0 keeps the block's input width);
* up block (``L'+1`` of the teacher's ``L+1``): ``0 .. L'-1`` and the teacher's last, ``L``
  (the last one takes the previous level's skip, of the other width); the teacher's ``L'..L-1`` go;
* ``inner``: student up block ``j`` is teacher up block ``j + 1``; the last kept down block
  loses its downsampler (it becomes the final block), so the mid block runs one level higher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..contract import StepdistillError

CUTS = ("layers", "mid", "inner")
PLANS = {"bk-base": ("layers",), "bk-small": ("layers", "mid"), "bk-tiny": ("layers", "mid", "inner")}
ADAPTIVE = "bk"  # every BK cut that fits
NETWORKS = ("UNet2DModel", "UNet2DConditionModel")
# UNet2DConditionModel fields given per down block (a list) or once (an int/bool)
_PER_BLOCK = ("layers_per_block", "transformer_layers_per_block", "num_attention_heads", "attention_head_dim",
              "only_cross_attention", "cross_attention_dim")


@dataclass
class Compression:
    """A compressed config and how its modules map onto the teacher's."""

    plan: str
    cuts: tuple[str, ...]
    config: dict  # the student's diffusers config
    teacher_layers: list[int]  # layers_per_block of the teacher, per down block
    levels: int  # down blocks of the teacher
    fresh: list[str] = field(default_factory=list)  # student tensors that got no teacher weight

    def teacher_name(self, name: str) -> str:
        """The teacher module/tensor name a student module/tensor name replaces."""
        head = re.match(r"(down_blocks|up_blocks)\.(\d+)(\.|$)", name)
        if head is None:
            return name
        kind, block = head.group(1), int(head.group(2))
        t_block = block + 1 if (kind == "up_blocks" and "inner" in self.cuts) else block
        rest = name[head.end(2):]
        layer = re.match(r"\.(resnets|attentions)\.(\d+)(\.|$)", rest)
        if layer is not None and "layers" in self.cuts:
            k = int(layer.group(2))
            level = t_block if kind == "down_blocks" else self.levels - 1 - t_block
            teacher_l = self.teacher_layers[level]
            if kind == "up_blocks" and k == teacher_l - 1:  # the student's last up layer is the teacher's last
                k = teacher_l
            rest = f".{layer.group(1)}.{k}" + rest[layer.end(2):]
        return f"{kind}.{t_block}{rest}"


def plan_cuts(plan: str) -> tuple[str, ...] | None:
    """The cuts a plan names (None for the adaptive ``bk``); a one-line error for an unknown plan."""
    if plan == ADAPTIVE:
        return None
    if plan in PLANS:
        return PLANS[plan]
    cuts = tuple(plan.split("+"))
    if not plan or any(c not in CUTS for c in cuts) or len(set(cuts)) != len(cuts):
        raise StepdistillError(f"compress plan {plan!r} is not one of {ADAPTIVE}, {', '.join(PLANS)} or a '+'-list of "
                               f"the cuts {', '.join(CUTS)} (e.g. mid+inner)")
    return cuts


def _layers(config: dict) -> list[int]:
    lpb, n = config.get("layers_per_block", 2), len(config["down_block_types"])
    return list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n


def _why_not(cut: str, config: dict) -> str | None:
    """Why ``cut`` does not fit the network (None: it fits)."""
    widths = list(config["block_out_channels"])
    if cut == "layers" and min(_layers(config)) < 2:
        return f"layers_per_block is {config.get('layers_per_block')} (needs >= 2 to drop one)"
    if cut == "mid" and config.get("mid_block_type", "default") is None:
        return "the network has no mid block"
    if cut == "inner":
        if len(widths) < 2:
            return "the network has a single level"
        if widths[-1] != widths[-2]:
            return f"its two innermost levels differ in width ({widths[-2]} vs {widths[-1]}), so the cut is not width-preserving"
    return None


def compressed_config(config: dict, plan: str) -> Compression:
    """The student's diffusers config under ``plan`` (a teacher config dict in, nothing built)."""
    name = config.get("_class_name", "?")
    if name not in NETWORKS:
        raise StepdistillError(f"student.init=compress (plan {plan!r}) supports {' and '.join(NETWORKS)} networks; "
                               f"the teacher's is {name}")
    cuts = plan_cuts(plan)
    if cuts is None:
        cuts = tuple(c for c in CUTS if _why_not(c, config) is None)
        if not cuts:
            raise StepdistillError(f"student.compress={plan}: no cut fits this {name} ({'; '.join(_why_not(c, config) for c in CUTS)})")
    for cut in cuts:
        why = _why_not(cut, config)
        if why:
            raise StepdistillError(f"student.compress={plan} does not fit this {name}: cut {cut!r} needs it, but {why}")
    new = {k: v for k, v in config.items() if not k.startswith("_")}
    if "layers" in cuts:
        lpb = config.get("layers_per_block", 2)
        new["layers_per_block"] = [v - 1 for v in lpb] if isinstance(lpb, (list, tuple)) else lpb - 1
    if "mid" in cuts:
        new["mid_block_type"] = None
    if "inner" in cuts:
        _drop_inner_level(new)
    return Compression(plan, cuts, new, _layers(config), len(config["down_block_types"]))


def _drop_inner_level(cfg: dict) -> None:
    cfg["block_out_channels"] = list(cfg["block_out_channels"])[:-1]
    cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
    cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
    for key in _PER_BLOCK:
        if isinstance(cfg.get(key), (list, tuple)):
            cfg[key] = list(cfg[key])[:-1]
    if isinstance(cfg.get("reverse_transformer_layers_per_block"), (list, tuple)):
        cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"])[1:]


def compress_model(model, plan: str, log=print):
    """A smaller diffusers network of the teacher's class, with the teacher's remaining weights (fp32).

    Returns the student; ``student._stepdistill_compression`` holds its ``Compression`` (the
    module map the feature term aligns layers with, and any tensors freshly initialised).
    """
    comp = compressed_config(dict(model.config), plan)
    student = type(model).from_config(comp.config).float()
    teacher_state = model.state_dict()
    state = student.state_dict()
    for key, value in state.items():
        source = teacher_state.get(comp.teacher_name(key))
        if source is None or source.shape != value.shape:
            comp.fresh.append(key)
            continue
        value.copy_(source.float())
    student._stepdistill_compression = comp
    p_t, p_s = (sum(p.numel() for p in m.parameters()) for m in (model, student))
    copied = "every tensor copied from the teacher" if not comp.fresh else \
        f"{len(comp.fresh)} tensors freshly initialised (no teacher weight of that shape): {comp.fresh[:6]}"
    log(f"init=compress, plan {plan} = cuts {'+'.join(comp.cuts)} on {type(model).__name__}: "
        f"{p_s:,} of the teacher's {p_t:,} parameters ({100 * p_s / p_t:.1f}%); {copied}")
    return student


def compression_of(model) -> Compression | None:
    """The ``Compression`` of a student network built by ``compress_model`` (None otherwise)."""
    return getattr(model, "_stepdistill_compression", None)


__all__ = ["CUTS", "PLANS", "Compression", "compressed_config", "compress_model", "compression_of", "plan_cuts"]
