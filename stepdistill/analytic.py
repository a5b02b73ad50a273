"""The analytic teacher: a Gaussian mixture whose exact x0-denoiser is known at every t.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions (2-D points, or image-shaped [C, H, W]).
Under x_t = a x0 + s_t noise, each component gives x_t | k ~ N(a mu_k, v_k I) with
v_k = a^2 s_k^2 + s_t^2, so

    p(k | x_t) = softmax_k( log w_k - D/2 log v_k - |x_t - a mu_k|^2 / (2 v_k) )
    E[x0 | x_t] = sum_k p(k | x_t) ( mu_k + (a s_k^2 / v_k) (x_t - a mu_k) )

This is the ground truth for convergence tests (EDM's toy example takes the same idea).
Components can belong to classes; the label ``num_classes`` is the null (unconditional) label.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .contract import Cond, NoiseSchedule, as_time


class GaussianMixture(nn.Module):
    """Exact denoiser of an isotropic Gaussian mixture; a ``Denoiser`` like any other.

    Args:
        means: [K, *shape] component means.
        stds: [K] component standard deviations (isotropic).
        weights: [K] mixture weights (normalised here).
        schedule: the noise schedule the denoiser is defined under.
        classes: [K] class index per component, or None for an unconditional mixture.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, schedule: NoiseSchedule, classes: Tensor | None = None):
        super().__init__()
        self.shape = tuple(means.shape[1:])
        self.register_buffer("means", means.reshape(len(means), -1).float())  # [K, D]
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float32).expand(len(means)).clone())  # [K]
        w = torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("log_w", (w / w.sum()).log())  # [K]
        self.num_classes = 0 if classes is None else int(classes.max()) + 1
        self.register_buffer("classes", torch.zeros(len(means), dtype=torch.long) if classes is None else classes.long())
        self.schedule = schedule

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _log_prior(self, cond: Cond | None, batch: int) -> Tensor:
        """log w_k restricted to each sample's class: [B, K]."""
        log_w = self.log_w.expand(batch, -1)
        labels = None if cond is None else cond.get("class_labels")
        if labels is None or self.num_classes == 0:
            return log_w
        labels = labels.to(self.classes.device).long()  # [B]
        keep = (self.classes[None] == labels[:, None]) | (labels[:, None] == self.null_class)  # [B, K]
        return torch.where(keep, log_w, torch.full_like(log_w, -math.inf))

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        t = as_time(t, x_t)
        x = x_t.reshape(len(x_t), -1).float()  # [B, D]
        a = self.schedule.alpha(t).to(x.device)[:, None]  # [B, 1]
        s = self.schedule.sigma(t).to(x.device)[:, None]
        var = a**2 * self.stds[None] ** 2 + s**2  # [B, K]
        centred = x[:, None] - a[:, :, None] * self.means[None]  # [B, K, D]
        diff2 = (centred**2).sum(-1)  # [B, K]
        d = x.shape[1]
        logits = self._log_prior(cond, len(x)) - 0.5 * d * var.log() - diff2 / (2 * var)  # [B, K]
        resp = logits.softmax(-1)  # [B, K]
        gain = a * self.stds[None] ** 2 / var  # [B, K]
        post = self.means[None] + gain[..., None] * centred  # [B, K, D]
        x0 = (resp[..., None] * post).sum(1)  # [B, D]
        return x0.reshape(x_t.shape).to(x_t.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, class_labels: Tensor | None = None) -> Tensor:
        """Exact samples x0 [n, *shape], optionally conditioned on class labels [n]."""
        cond = None if class_labels is None else {"class_labels": class_labels}
        log_prior = self._log_prior(cond, n).cpu()
        k = torch.multinomial(log_prior.softmax(-1), 1, generator=generator).squeeze(1)  # [n]
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        x0 = self.means.cpu()[k] + self.stds.cpu()[k, None] * noise
        return x0.reshape(n, *self.shape).to(self.means.device)

    def log_prob(self, x0: Tensor) -> Tensor:
        """Exact log-density of clean data points [B, *shape] -> [B]."""
        x = x0.reshape(len(x0), -1).float()
        var = self.stds[None] ** 2  # [1, K]
        diff2 = ((x[:, None] - self.means[None]) ** 2).sum(-1)
        d = x.shape[1]
        return torch.logsumexp(self.log_w - 0.5 * d * (2 * math.pi * var).log() - diff2 / (2 * var), dim=-1)

    def assign(self, x0: Tensor) -> Tensor:
        """Index of the nearest component mean for each sample [B]."""
        return torch.cdist(x0.reshape(len(x0), -1).float(), self.means).argmin(-1)


def ring2d(schedule: NoiseSchedule, modes: int = 8, radius: float = 2.0, std: float = 0.08, classes: bool = False) -> GaussianMixture:
    """``modes`` equal-weight Gaussians evenly spaced on a circle (the classic mode-coverage toy)."""
    angle = torch.arange(modes) * (2 * math.pi / modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], -1)  # [K, 2]
    labels = torch.arange(modes) if classes else None
    return GaussianMixture(means, torch.full((modes,), std), torch.ones(modes), schedule, labels)


def image_mixture(schedule: NoiseSchedule, num_classes: int = 10, per_class: int = 2, shape=(1, 8, 8), std: float = 0.1, seed: int = 0) -> GaussianMixture:
    """Image-shaped class-conditional mixture: ``per_class`` random +-0.8 'templates' per class."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * per_class
    means = 0.8 * torch.sign(torch.randn(k, *shape, generator=g))  # [K, C, H, W]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return GaussianMixture(means, torch.full((k,), std), torch.ones(k), schedule, labels)


__all__ = ["GaussianMixture", "ring2d", "image_mixture"]
