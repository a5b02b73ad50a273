"""LADD: latent adversarial diffusion distillation with the frozen teacher as the feature network.

Paper: "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation",
Sauer et al., arXiv:2403.12015 (Sec. 3); hinge loss as in ADD (arXiv:2311.17042, Eq. 2-4).

    x = G(z)                                    one- or K-step student (grad on the last step)
    t ~ sigmoid(N(m, s^2)),  x_t = alpha_t x + sigma_t eps                   logit-normal re-noising
    D(x_t) = mean_k head_k(T_k(x_t, t, c), t)    frozen teacher features T_k, trainable heads
    L_D = mean relu(1 - D(real_t)) + mean relu(1 + D(sg(x)_t))            discriminator phase (hinge)
    L_G = -mean D(x_t)                                                      student phase (grad through the
                                                                            frozen teacher into x)

"Real" samples: ``batch.real`` when the run has data (``data.real``; SANA-Sprint and FastGen use
data), else the teacher's own PF-ODE samples with CFG ``guidance_scale`` (LADD's choice: the
guidance is baked into the data, so the student learns the guided distribution and samples
without CFG; it also needs no dataset and matches the teacher's latent space). The same t is
used for real and fake, with independent noise. The heads (``extra_networks``: "discriminator")
read ``features.default_feature_layers`` of the teacher (UNet: mid block; transformers: middle
and last block) or ``feature_layers``; they are trained with the run's ``discriminator`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...contract import add_noise
from ...adapters.capture import capture, default_feature_layers, feature_dims
from ...sampling import few_step_sample
from ..base import Batch, LossOut, Nets, Objective
from ..consistency.common import CleanSamples
from ..registry import register


class Head(nn.Module):
    """One head: conv (feature map [B, C, H, W]) or token MLP ([B, N, D] / [B, D]), FiLM on t -> logits [B, P]."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 64, t_features: int = 16):
        super().__init__()
        self.spatial = len(shape) == 3
        ch = shape[0] if self.spatial else shape[-1]
        self.inp = nn.Conv2d(ch, hidden, 3, padding=1) if self.spatial else nn.Linear(ch, hidden)
        self.out = nn.Conv2d(hidden, 1, 1) if self.spatial else nn.Linear(hidden, 1)
        self.register_buffer("freqs", torch.logspace(0, 3, t_features))  # [K]
        self.film = nn.Linear(2 * t_features, 2 * hidden)

    def forward(self, f: Tensor, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]  # [B, K]
        scale, shift = self.film(torch.cat([arg.sin(), arg.cos()], 1)).chunk(2, 1)  # [B, hidden] each
        h = self.inp(f.float())  # [B, hidden, H, W] | [B, N, hidden] | [B, hidden]
        view = (len(f), -1, 1, 1) if self.spatial else (len(f),) + (1,) * (h.ndim - 2) + (-1,)
        h = F.leaky_relu(h * (1 + scale.reshape(view)) + shift.reshape(view), 0.2)
        return self.out(h).reshape(len(f), -1)  # [B, P] logits per position


class Discriminator(nn.Module):
    """Independent heads, one per teacher layer (LADD Sec. 3.2)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], hidden: int = 64):
        super().__init__()
        self.layers = list(shapes)
        self.heads = nn.ModuleDict({k.replace(".", "/"): Head(s, hidden) for k, s in shapes.items()})

    def forward(self, feats: dict[str, Tensor], t: Tensor) -> Tensor:
        return torch.cat([self.heads[k.replace(".", "/")](feats[k], t) for k in self.layers], 1)  # [B, sum P]


def device_of(module) -> torch.device:
    tensor = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@register("ladd")
@dataclass
class LADD(Objective):
    guidance_scale: float = 1.0  # teacher CFG baked into the teacher-made "real" samples (without data.real)
    logit_mean: float = 1.0  # re-noise t = sigmoid(N(m, s^2)) (LADD: high-noise bias m ~ 1, s ~ 1 [unverified])
    logit_std: float = 1.0
    t_min: float = 0.02  # clamp of the re-noise time
    t_max: float = 0.98
    disc_ratio: int = 1  # discriminator updates per student update
    head_hidden: int = 64  # channels of each discriminator head
    feature_layers: list[str] = field(default_factory=list)  # teacher layers; empty = features.default_feature_layers
    synthetic_pool: int = 512  # teacher samples made once (fixed seed) and drawn from; 0 = fresh each batch
    synthetic_steps: int = 16  # teacher PF-ODE steps per synthetic sample

    trains = ("student", "discriminator")
    ranges = {"disc_ratio": (1, None), "t_min": (0.0, "t_max"), "t_max": (0.0, 1.0), "logit_std": (0.0, None),
              "head_hidden": (1, None)}

    def setup(self):
        self._data = CleanSamples(self.synthetic_pool, self.synthetic_steps, self.guidance_scale)

    @property
    def phases(self) -> dict[str, int]:
        return {"discriminator": self.disc_ratio, "student": 1}

    def layers(self, teacher_denoiser) -> list[str]:
        return list(self.feature_layers) or default_feature_layers(teacher_denoiser)

    def extra_networks(self, teacher) -> dict[str, nn.Module]:
        """Heads sized by one dry teacher forward at t = 0.5."""
        den = teacher.denoiser
        device = device_of(den)
        cond, _ = teacher.conditioner(2, torch.Generator().manual_seed(0))
        cond = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in cond.items()}
        x = torch.randn(2, *teacher.sample_shape, device=device)
        shapes = feature_dims(den, self.layers(den), lambda: den(x, torch.full((2,), 0.5, device=device), cond))
        return {"discriminator": Discriminator(shapes, self.head_hidden)}

    def sample_t(self, batch: Batch, rng: torch.Generator) -> Tensor:
        """Logit-normal re-noise times [B], clamped to [t_min, t_max]."""
        u = self.logit_mean + self.logit_std * torch.randn(batch.size, generator=rng)
        return torch.sigmoid(u).clamp(self.t_min, self.t_max).to(batch.device)

    def logits(self, nets: Nets, x: Tensor, t: Tensor, cond: dict, rng: torch.Generator, batch: Batch) -> Tensor:
        """D(x_t): heads on the frozen teacher's features of x re-noised at t [B, P]."""
        return nets.extra["discriminator"](self._features(nets, x, t, cond, rng, batch), t)

    def discriminator_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        with torch.no_grad():
            fake = few_step_sample(nets.student, batch.noise(rng), batch.cond, nets.student_times, rng)
        real, real_cond, source = self._data.draw(nets, batch, rng)
        t = self.sample_t(batch, rng)
        with torch.no_grad():  # the teacher is frozen: only the heads need a graph
            feats_real = self._features(nets, real, t, real_cond, rng, batch)
            feats_fake = self._features(nets, fake, t, batch.cond, rng, batch)
        d_real = nets.extra["discriminator"](feats_real, t)  # [B, P]
        d_fake = nets.extra["discriminator"](feats_fake, t)
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()  # hinge (ADD Eq. 3)
        logs = {"d_real": d_real.detach().mean().item(), "d_fake": d_fake.detach().mean().item(),
                "real_data": float(source == "real")}
        return LossOut(loss, logs)

    def _features(self, nets: Nets, x: Tensor, t: Tensor, cond: dict, rng: torch.Generator, batch: Batch) -> dict[str, Tensor]:
        x_t = add_noise(nets.teacher.schedule, x, batch.noise(rng), t)
        with capture(nets.teacher, self.layers(nets.teacher)) as feats:
            nets.teacher(x_t, t, cond)
        return dict(feats)

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x = few_step_sample(nets.student, batch.noise(rng), batch.cond, nets.student_times, rng, grad=True)
        t = self.sample_t(batch, rng)
        d_fake = self.logits(nets, x, t, batch.cond, rng, batch)
        loss = -d_fake.mean()  # hinge generator loss (ADD Eq. 4)
        return LossOut(loss, {"g_adv": loss.item(), "x_student_std": x.detach().std().item()})
