"""DMD2: Improved Distribution Matching Distillation.

Paper: "Improved Distribution Matching Distillation for Fast Image Synthesis", Yin et al.,
NeurIPS 2024, arXiv:2405.14867. DMD (``dmd.py``) minus the regression loss, plus:

* TTUR: ``critic_ratio`` fake-score updates per student update (Sec. 4.2; 5 ImageNet/SDXL, 10 SD1.5).
* A GAN classifier on the FAKE score's bottleneck features (Sec. 4.3), non-saturating loss,
  diffusion-GAN style (real and fake re-noised to the same t_gan ~ U[gan_t_min, gan_t_max]):

      L_D = softplus(H(F_enc(x_t))) + softplus(-H(F_enc(real_t)))      x = sg(G(z))
      L_G = softplus(-H(F_enc(x_t)))                                   grad into G through x only

  Phases (as the official code: one optimizer over fake UNet + head):
      fake_score phase  -> updates fake_score AND gan_head:  L_F = DSM (DMD Eq. 6) + gan_d_weight * L_D
                           (L_D also trains the fake score's encoder: the head shares it)
      student phase     -> updates student:  L_G = L_DM (dmd.py, Eq. 7-8) + gan_weight * L_G
  The GAN term reaches the student as its gradient at the student output (``gan_term``): logged
  against the DM term's (``gan_share``) and, with ``gan_max_share``, capped to a share of it.
  The head (``extra_networks`` -> "gan_head") is LADD's per-layer head (``ladd.Discriminator``:
  conv or token MLP with FiLM on t_gan, one logit per position) rather than DMD2's exact
  4x4-conv stack; the official head reads one 8x8 mid-block map the same way. Real samples are
  ``batch.real`` (``data.real=digits|teacher|<folder>``); without them gan_weight must be 0.
* Multi-step students: backward simulation (Sec. 4.5; ``score_common.student_sample``), for
  both the critic's samples and the generator's: a random step k per update, only k trained.
* Optional Decoupled DMD (Liu et al., arXiv:2511.22677; reference 4.1), ``cfg_split=true``:
  the CFG teacher's direction split into a distribution-matching and a CFG-augmentation term,
  each with its own time draw and its own normaliser mean|x - x_real,c| [unverified]:
      g_DM = (x_fake,c - x_real,c)(x_t)                              t ~ U[t_min, t_max]
      g_CA = -(w - 1)(x_real,c - x_real,u)(x_tau)                    tau ~ U[ca_t_min, ca_t_max]
      L = 1/2 mean((x - sg(x - g_DM - ca_weight g_CA))^2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...conditioning import concat_cond
from ...contract import StepdistillError, add_noise, expand_like
from ...adapters.capture import capture, default_feature_layers, feature_dims
from ...training.networks import unwrap
from ...schedules import loss_weight
from ..base import Batch, LossOut, Nets
from .dmd import DMD, per_sample_mean
from ..adversarial.ladd import Discriminator, device_of
from ..registry import register
from .common import frozen, student_sample


class GanHead(nn.Module):
    """Classifier on fake-score features: ``ladd.Discriminator`` heads; flat (MLP) features are
    average-pooled to ``flat_width`` first, so one head fits any MLP width -> logits [B, P]."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], hidden: int = 64, flat_width: int = 32):
        super().__init__()
        self.flat_width = flat_width
        self.disc = Discriminator({k: (flat_width,) if len(s) == 1 else s for k, s in shapes.items()}, hidden)

    def forward(self, feats: dict[str, Tensor], t: Tensor) -> Tensor:
        pooled = {k: F.adaptive_avg_pool1d(v.float().reshape(len(v), 1, -1), self.flat_width)[:, 0] if v.ndim == 2 else v
                  for k, v in feats.items()}
        return self.disc(pooled, t)


@register("dmd2")
@dataclass
class DMD2(DMD):
    critic_ratio: int = 5  # TTUR: fake-score (+ head) updates per student update (DMD2: 5, SD1.5 10)
    critic_t_min: float = 0.0  # fake-score DSM times (DMD2 SD: U{0..999})
    critic_t_max: float = 1.0
    gan_weight: float = 0.0  # generator GAN weight (gen_cls_loss_weight: 3e-3 IN64, 1e-3 SD1.5, 5e-3 SDXL); 0 = no GAN
    gan_d_weight: float = 1e-2  # classifier loss weight in the critic phase (guidance_cls_loss_weight, 1e-2)
    gan_t_min: float = 0.0  # diffusion-GAN re-noise times t_gan ~ U[gan_t_min, gan_t_max] (DMD2: U{0..999})
    gan_t_max: float = 1.0
    head_hidden: int = 64  # channels of the GAN head
    gan_max_share: float = 0.0  # cap the GAN gradient at the student output to this share of the DM gradient's norm (0 = no cap; logged as gan_share either way)
    feature_layers: list[str] = field(default_factory=list)  # fake-score layers the head reads; empty = default (UNet: mid_block)
    cfg_split: bool = False  # Decoupled DMD: separate DM and CFG-augmentation terms (needs guidance_scale != 1)
    ca_weight: float = 1.0  # weight of the CFG-augmentation term
    ca_t_min: float = 0.02  # CA-term times tau ~ U[ca_t_min, ca_t_max] [unverified]
    ca_t_max: float = 0.98

    ranges = DMD.ranges | {"gan_weight": (0.0, None), "gan_d_weight": (0.0, None), "gan_t_min": (0.0, "gan_t_max"),
                           "gan_t_max": (0.0, 1.0), "ca_t_min": (0.0, "ca_t_max"), "head_hidden": (1, None),
                           "gan_max_share": (0.0, None)}

    def setup(self):
        super().setup()
        if self.regression_weight > 0:
            raise StepdistillError("objective.regression_weight: DMD2 drops DMD's regression loss (the GAN term replaces it); "
                                   "use objective.name=dmd for regression")
        self.trains = ("student", "fake_score", "gan_head") if self.gan else ("student", "fake_score")

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0

    def phase_updates(self, phase: str) -> tuple[str, ...]:
        return ("fake_score", "gan_head") if (phase == "fake_score" and self.gan) else (phase,)

    @property
    def graph_nets(self) -> dict[str, tuple[str, ...]]:
        """Activations kept per phase (``stepdistill plan``): the GAN G term backprops through the fake score."""
        return {"fake_score": ("fake_score",), "student": ("student", "fake_score") if self.gan else ("student",)}

    # -- networks --------------------------------------------------------------------------------

    def layers(self, denoiser) -> list[str]:
        return list(self.feature_layers) or default_feature_layers(denoiser)

    def extra_networks(self, teacher) -> dict[str, nn.Module]:
        """The GAN head, sized by one dry forward of the teacher (same architecture as the fake score)."""
        if not self.gan:
            return {}
        if teacher.sample_data is not None:  # analytic teacher: the fake score is an MLP (features "body", flat)
            return {"gan_head": GanHead({"body": (1,)}, self.head_hidden)}
        den = teacher.denoiser
        device = device_of(den)
        cond, _ = teacher.conditioner(2, torch.Generator().manual_seed(0))
        cond = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in cond.items()}
        x = torch.randn(2, *teacher.sample_shape, device=device)
        shapes = feature_dims(den, self.layers(den), lambda: den(x, torch.full((2,), 0.5, device=device), cond))
        return {"gan_head": GanHead(shapes, self.head_hidden)}

    # -- losses ----------------------------------------------------------------------------------

    def fake_score_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        with torch.no_grad():
            x, k = student_sample(nets, batch, rng, grad=False)  # [B, ...]
        t = batch.uniform(rng, self.critic_t_min, self.critic_t_max)  # [B]
        x_t = add_noise(nets.fake_score.schedule, x, batch.noise(rng), t)
        logs = {"step_k": float(k)}
        if self.gan:  # one batched fake-score call: DSM inputs, then fake and real for the classifier
            real, real_cond = self._real(batch)
            t_gan = batch.uniform(rng, self.gan_t_min, self.gan_t_max)
            fake_g = add_noise(nets.fake_score.schedule, x, batch.noise(rng), t_gan)
            real_g = add_noise(nets.fake_score.schedule, real.to(x.dtype), batch.noise(rng), t_gan)
            cond = concat_cond(concat_cond(batch.cond, batch.cond), real_cond)
            with capture(nets.fake_score, self.layers(nets.fake_score)) as feats:
                out = nets.fake_score(torch.cat([x_t, fake_g, real_g]), torch.cat([t, t_gan, t_gan]), cond)  # [3B, ...]
            x_fake = out[: batch.size]
            logits = nets.extra["gan_head"]({n: f[batch.size:] for n, f in feats.items()}, torch.cat([t_gan, t_gan]))
            d_fake, d_real = logits.chunk(2)  # [B, P] each
            loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()  # non-saturating D loss (Sec. 4.3)
            logs |= {"gan_d_loss": loss_d.item(), "d_fake": d_fake.detach().mean().item(), "d_real": d_real.detach().mean().item()}
        else:
            x_fake, loss_d = nets.fake_score(x_t, t, batch.cond), 0.0
        weight = loss_weight(nets.fake_score.schedule, t, self.critic_weighting).to(x.device)  # [B]
        dsm = (weight * per_sample_mean((x_fake.float() - x.float()) ** 2)).mean()  # DMD Eq. 6
        logs["fake_dsm"] = dsm.item()
        return LossOut(dsm + self.gan_d_weight * loss_d, logs)

    def student_loss(self, nets: Nets, batch: Batch, rng: torch.Generator) -> LossOut:
        x, k = student_sample(nets, batch, rng, grad=True)  # [B, ...], graph through step k only
        loss, logs = self.decoupled_loss(nets, batch, rng, x) if self.cfg_split else self.dm_loss(nets, batch, rng, x)
        logs["step_k"] = float(k)
        if self.gan:
            t_gan = batch.uniform(rng, self.gan_t_min, self.gan_t_max)
            fake = frozen(nets.fake_score)  # weights frozen this phase; the graph runs through x
            x_t = add_noise(fake.schedule, x, batch.noise(rng), t_gan)
            with capture(fake, self.layers(fake)) as feats:
                fake(x_t, t_gan, batch.cond)
            d_fake = unwrap(nets.extra["gan_head"])(dict(feats), t_gan)  # [B, P]
            loss_g = F.softplus(-d_fake).mean()  # non-saturating G loss
            loss = loss + self.gan_term(x, loss_g, logs)
            logs |= {"gan_g_loss": loss_g.item()}
        return LossOut(loss, logs)

    def gan_term(self, x: Tensor, loss_g: Tensor, logs: dict[str, float]) -> Tensor:
        """The generator's GAN term as its gradient at the student output x (issue 17, item 4).

        ``autograd.grad`` takes the GAN term's gradient at x through the frozen fake score and the
        head (the same backward the summed loss would run), so it can be measured against the DM
        term's, logged (``gan_grad_norm``, ``dm_x_grad_norm``, ``gan_share``: per-sample norms of
        each term's gradient of the loss at x, and their ratio) and, with ``gan_max_share`` > 0,
        scaled down to at most that share of the DM gradient before it reaches the student.
        """
        g_gan = torch.autograd.grad(self.gan_weight * loss_g, x, retain_graph=True)[0].float()  # [B, ...]
        gan_norm = g_gan.reshape(len(x), -1).norm(dim=1).mean()
        # |g_i| / N: the surrogate's grad at x_i (with cfg_split, DM + CA: all the distillation gradient)
        dm_norm = torch.tensor(logs.get("distill_grad_norm", logs["dm_grad_norm"]) / x[0].numel() / len(x))
        share = (gan_norm / dm_norm.clamp_min(1e-30)).item()
        if self.gan_max_share > 0 and share > self.gan_max_share:
            g_gan = g_gan * (self.gan_max_share / share)
        logs |= {"gan_grad_norm": gan_norm.item(), "dm_x_grad_norm": dm_norm.item(), "gan_share": share}
        return (x.float() * g_gan.detach()).sum()  # d/dx = g_gan

    def decoupled_loss(self, nets: Nets, batch: Batch, rng: torch.Generator, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Decoupled DMD: DM term (no CFG) + CA term (teacher CFG only), separate t and normalisers."""
        if batch.null_cond is None or self.guidance_scale == 1.0:
            raise StepdistillError("objective.cfg_split needs a teacher with a null condition and guidance_scale != 1")
        with torch.no_grad():
            t = batch.uniform(rng, self.t_min, self.t_max)
            x_t = add_noise(nets.teacher.schedule, x.detach(), batch.noise(rng), t)
            real_c, fake_c = nets.teacher(x_t, t, batch.cond).float(), nets.fake_score(x_t, t, batch.cond).float()
            g_dm = (fake_c - real_c) * expand_like(self._inv_norm(x, real_c), x)
            tau = batch.uniform(rng, self.ca_t_min, self.ca_t_max)
            x_tau = add_noise(nets.teacher.schedule, x.detach(), batch.noise(rng), tau)
            both = nets.teacher(torch.cat([x_tau, x_tau]), torch.cat([tau, tau]), concat_cond(batch.cond, batch.null_cond))
            tc, tu = both.float().chunk(2)
            g_ca = -(self.guidance_scale - 1) * (tc - tu) * expand_like(self._inv_norm(x, tc), x)
            g = g_dm + self.ca_weight * g_ca
        loss = 0.5 * F.mse_loss(x.float(), x.detach().float() - g)  # surrogate: dL/dx = g / N
        logs = {"dm_loss": loss.item(), "dm_grad_norm": g_dm.reshape(len(x), -1).norm(dim=1).mean().item(),
                "ca_grad_norm": g_ca.reshape(len(x), -1).norm(dim=1).mean().item(),
                "distill_grad_norm": g.reshape(len(x), -1).norm(dim=1).mean().item()}
        return loss, logs

    def _inv_norm(self, x: Tensor, x_real: Tensor) -> Tensor:
        return 1 / (per_sample_mean((x.detach().float() - x_real).abs()) + self.normaliser_eps)  # [B]

    def _real(self, batch: Batch) -> tuple[Tensor, dict]:
        """Real samples and their condition (their own labels when the data has them)."""
        if batch.real is None:
            raise StepdistillError("objective.gan_weight > 0 needs real data: set data.real=digits|teacher|<folder>, "
                                   "or objective.gan_weight=0")
        cond = dict(batch.cond)
        if batch.real_labels is not None and "class_labels" in cond:
            cond["class_labels"] = batch.real_labels.to(cond["class_labels"].device)
        return batch.real, cond
