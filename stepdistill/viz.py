"""Sample pictures: scatter plots for 2-D data, image grids for images."""

from __future__ import annotations

from pathlib import Path


from torch import Tensor


def save_samples(samples: Tensor, path: Path, reference: Tensor | None = None, nrow: int = 8, title: str = "") -> Path:
    """2-D points [N, 2] -> scatter (reference in grey); images [N, C, H, W] in [-1, 1] -> grid PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return _scatter(samples, path, reference, title)
    from torchvision.utils import save_image

    images = samples.float().clamp(-1, 1) * 0.5 + 0.5  # [N, C, H, W] in [0, 1]
    if images.shape[1] not in (1, 3):
        images = images[:, :3] if images.shape[1] > 3 else images[:, :1]
    save_image(images, str(path), nrow=nrow, padding=1)
    return path


def _scatter(points: Tensor, path: Path, reference: Tensor | None, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().float()
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.75", label="teacher data")
    pts = points.detach().cpu().float()
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:red", label="student")
    lim = max(3.0, float(pts.abs().quantile(0.99)) * 1.1) if len(pts) else 3.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["save_samples"]
