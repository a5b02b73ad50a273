"""Feature distillation: a student-phase companion term that regresses the student's features onto the teacher's.

BK-SDM (Kim et al., arXiv 2305.15798, Eq. 3-4) and KOALA (Lee et al., "KOALA: Empirical
Lessons Toward Memory-Efficient and Fast Diffusion Models for Text-to-Image Synthesis", arXiv
2312.04005, Sec. 3.2: self-attention features distil best) train a smaller UNet with

    L = L_task + lambda_feat * mean_l || f_l^S(x_t, t, c) - f_l^T(x_t, t, c) ||^2

where ``l`` runs over aligned layers (the same kept block in student and teacher) and both
networks see the SAME noised input x_t = alpha(t) x0 + sigma(t) eps. Here ``L_task`` is any
registered step-distillation objective; the term is added to every phase that updates the
student (``student.feature_weight``; 0 = off). x0 is the batch's real data when the run has
``data.real``, else the teacher's own few-step sample at the student's times (no grad); t is
drawn per sample from the student's times, where the generator is evaluated.

``student.feature_layers``: ``attn`` (self-attention outputs: diffusers ``Attention`` modules
that are not cross-attention), ``blocks`` (down/mid/up block outputs of equal shape), ``out``
(the x0 output only: BK-SDM's output-distillation baseline). Student layers are matched to the
teacher's through the compression map (``adapters/compress.py``); a full copy matches by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import StepdistillError, add_noise
from .base import Batch, LossOut, Nets

LAYER_SETS = ("attn", "blocks", "out")


def _module(view) -> nn.Module:
    """The module a denoiser view calls (``Net.module``), or the view itself."""
    return getattr(view, "module", view)


def _teacher_name_fn(student_net: nn.Module):
    from ..adapters.compress import compression_of

    comp = compression_of(student_net)
    return comp.teacher_name if comp is not None else (lambda name: name)


def aligned_layers(student: nn.Module, teacher: nn.Module, layers: str) -> list[tuple[str, str]]:
    """(student name, teacher name) pairs of the chosen features, relative to the inner networks."""
    from ..training.networks import inner_model

    s_net, t_net = inner_model(student), inner_model(teacher)
    to_teacher, t_names = _teacher_name_fn(s_net), dict(t_net.named_modules())
    if layers == "attn":
        picked = [n for n, m in s_net.named_modules()
                  if type(m).__name__ == "Attention" and not getattr(m, "is_cross_attention", False)]
    else:  # blocks
        picked = [n for n, m in s_net.named_modules() if n == "mid_block" or n.count(".") == 1 and
                  n.split(".")[0] in ("down_blocks", "up_blocks") and m is not None]
    pairs = [(n, to_teacher(n)) for n in picked if to_teacher(n) in t_names]
    if not pairs:
        raise StepdistillError(f"student.feature_layers={layers}: no aligned {layers} layers in {type(s_net).__name__}; "
                               "try student.feature_layers=blocks or out")
    return pairs


@dataclass
class FeatureTerm:
    """weight * mean over aligned layers of the features' MSE (student vs teacher on one x_t)."""

    weight: float
    layers: str = "attn"

    def __post_init__(self):
        if self.layers not in LAYER_SETS:
            raise StepdistillError(f"student.feature_layers must be one of {', '.join(LAYER_SETS)}; got {self.layers!r}")
        self._pairs = None

    def noised(self, nets: Nets, batch: Batch, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x_t [B, ...], t [B]): real or teacher samples, noised at per-sample student times."""
        from ..sampling import few_step_sample

        times = torch.tensor(nets.student_times, dtype=torch.float32)
        t = times[torch.randint(len(times), (batch.size,), generator=rng)].to(batch.device)  # [B]
        noise = batch.noise(rng)  # [B, ...]
        if batch.real is not None:
            x0 = batch.real[: batch.size]
        else:
            with torch.no_grad():
                x0 = few_step_sample(nets.teacher, batch.noise(rng), batch.cond, nets.student_times, rng)  # [B, ...]
        return add_noise(nets.teacher.schedule, x0, noise, t), t

    def loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        from ..adapters.capture import capture

        x_t, t = self.noised(nets, batch, rng)
        if self.layers == "out":
            with torch.no_grad():
                target = nets.teacher(x_t, t, batch.cond).float()
            mse = F.mse_loss(nets.student(x_t, t, batch.cond).float(), target)
            return LossOut(mse, {"feature_mse": mse.item()})
        if self._pairs is None:
            self._pairs = aligned_layers(_module(nets.student), _module(nets.teacher), self.layers)
        s_names, t_names = zip(*self._pairs)
        with torch.no_grad(), capture(_module(nets.teacher), t_names) as f_t:
            nets.teacher(x_t, t, batch.cond)
            f_t = dict(f_t)  # a copy: with LoRA, the student's call below runs through the same modules
        with capture(_module(nets.student), s_names) as f_s:
            nets.student(x_t, t, batch.cond)
        terms = [F.mse_loss(f_s[s].float(), f_t[tn].float()) for s, tn in self._pairs if f_s[s].shape == f_t[tn].shape]
        if not terms:
            raise StepdistillError(f"student.feature_layers={self.layers}: no aligned layer has the same feature shape "
                                   "in student and teacher; try student.feature_layers=attn or out")
        mse = torch.stack(terms).mean()
        return LossOut(mse, {"feature_mse": mse.item(), "feature_layers": float(len(terms))})


class WithFeatureTerm:
    """An objective plus ``weight * FeatureTerm`` in every phase that updates the student.

    Everything else (trains, phases, capabilities, extra networks) is the wrapped objective's.
    """

    def __init__(self, objective, term: FeatureTerm):
        self._objective, self.term = objective, term

    def __getattr__(self, name):
        return getattr(self._objective, name)

    def loss(self, phase: str, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        out = self._objective.loss(phase, nets, batch, rng)
        if "student" not in self._objective.phase_updates(phase):
            return out
        extra = self.term.loss(nets, batch, rng)
        logs = out.logs | {f"feature/{k}": v for k, v in extra.logs.items()}
        return LossOut(out.loss + self.term.weight * extra.loss, logs)


def with_feature_term(objective, weight: float, layers: str = "attn"):
    """``objective`` itself when ``weight`` is 0, else it wrapped with the feature term."""
    return objective if weight <= 0 else WithFeatureTerm(objective, FeatureTerm(weight, layers))


__all__ = ["FeatureTerm", "WithFeatureTerm", "aligned_layers", "with_feature_term", "LAYER_SETS"]
