"""Composition: a weighted sum of registered objectives run as one (e.g. sCM + LADD = SANA-Sprint).

Recipe form (each part is a full objective section plus its ``weight``)::

    objective:
      name: compose
      parts:
        - {name: scm, weight: 1.0, guidance_scale_max: 2.0}
        - {name: ladd, weight: 0.1, disc_ratio: 1}

The composed objective runs the union of the parts' phases. In a phase that several parts
have (``student``), the losses are summed with their weights, L = sum_i w_i L_i, and the
phase updates the union of the networks the parts update there. Networks a part builds itself
(``extra_networks``) get the part's name as a prefix (``scm_logvar``, ``ladd_discriminator``);
the part still sees them under its own names. A phase must have the same update count in every
part that has it. Parts are validated like a top-level objective section (unknown key -> one
line naming ``objective.parts[i].key`` and the nearest valid key).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..contract import StepdistillError
from .base import Batch, LossOut, Nets, Objective
from .registry import register

SHARED = ("student", "fake_score")  # networks the trainer builds; never prefixed


@dataclass
class Part:
    label: str  # registry name (suffixed _i on repeats): the prefix of its networks and logs
    weight: float
    objective: object
    names: dict[str, str]  # the part's own network name -> the run's name


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _has(obj, capability: str) -> bool:
    """A capability of a part; False for parts that do not derive from ``Objective`` (dotted paths)."""
    return bool(getattr(obj, capability, False))


def _build_part(i: int, raw, labels: set[str]) -> Part:
    from ..config import build_objective_config

    path = f"objective.parts[{i}]"
    if not isinstance(raw, dict):
        raise StepdistillError(f"{path}: expected a mapping with name and weight, got {type(raw).__name__}")
    raw = dict(raw)
    weight = raw.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise StepdistillError(f"{path}.weight must be a number >= 0, got {weight!r}")
    if raw.get("name") == "compose":
        raise StepdistillError(f"{path}: a composed objective cannot contain another compose; list its parts here")
    obj = build_objective_config(raw, path)
    label = getattr(obj, "registry_name", type(obj).__name__.lower())
    label = f"{label}_{i}" if label in labels else label
    names = {n: (n if n in SHARED else f"{label}_{n}") for n in obj.trains}
    return Part(label, float(weight), obj, names)


@register("compose")
@dataclass
class Compose(Objective):
    parts: list[dict] = field(default_factory=list)  # [{name, weight, <that objective's keys>}, ...]; e.g. scm 1.0 + ladd 0.1

    trains = ()

    def setup(self):
        if not self.parts:
            raise StepdistillError("objective.parts is empty: list the objectives to combine, e.g. "
                                   "[{name: scm, weight: 1.0}, {name: ladd, weight: 0.1}]")
        built: list[Part] = []
        for i, raw in enumerate(self.parts):
            built.append(_build_part(i, raw, {p.label for p in built}))
        self._parts = built
        self.parts = [{"name": p.objective.registry_name, "weight": p.weight} | _fields(p.objective) for p in built]
        self.trains = tuple(dict.fromkeys(n for p in built for n in p.names.values()))
        self._phases: dict[str, int] = {}
        for p in built:
            for phase, count in p.objective.phases.items():
                if self._phases.setdefault(phase, count) != count:
                    raise StepdistillError(f"objective.parts: phase {phase!r} runs {self._phases[phase]} update(s) per round in one "
                                           f"part but {count} in {p.label}; make the counts equal")
        self.is_consistency = any(_has(p.objective, "is_consistency") for p in built)  # e.g. sCM + LADD
        self.exports_any_step_count = any(_has(p.objective, "exports_any_step_count") for p in built)

    @property
    def phases(self) -> dict[str, int]:
        return dict(self._phases)

    def phase_updates(self, phase: str) -> tuple[str, ...]:
        nets = [p.names[n] for p in self._in(phase) for n in p.objective.phase_updates(phase)]
        return tuple(dict.fromkeys(nets))

    @property
    def graph_nets(self) -> dict[str, tuple[str, ...]]:
        """Per phase, the networks whose activations the parts keep (for ``stepdistill plan``)."""
        out = {}
        for phase in self._phases:
            nets = []
            for p in self._in(phase):
                own = getattr(p.objective, "graph_nets", None) or {}  # parts outside the base (dotted paths) may lack it
                nets += [p.names.get(n, n) for n in own.get(phase, p.objective.phase_updates(phase))]
            out[phase] = tuple(dict.fromkeys(nets))
        return out

    def extra_networks(self, teacher) -> dict[str, nn.Module]:
        out = {}
        for p in self._parts:
            build = getattr(p.objective, "extra_networks", None)
            for name, module in (build(teacher) if build else {}).items():
                out[p.names[name]] = module
        return out

    def _in(self, phase: str) -> list[Part]:
        return [p for p in self._parts if phase in p.objective.phases]

    def loss(self, phase: str, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        parts = self._in(phase)
        if not parts:
            raise ValueError(f"composed objective has no phase {phase!r}")
        total, logs = 0.0, {}
        for p in parts:
            extra = {own: nets.extra[run] for own, run in p.names.items() if run in nets.extra}
            out = p.objective.loss(phase, dataclasses.replace(nets, extra=extra), batch, rng)
            total = total + p.weight * out.loss  # same-named phases: weighted sum
            logs |= {f"{p.label}/{k}": v for k, v in out.logs.items()} | {f"{p.label}/loss": out.loss.item()}
        return LossOut(total, logs)
