"""CLIP score with open_clip from a local folder (nothing is downloaded).

The folder is open_clip's ``local-dir:`` layout: ``open_clip_config.json`` (``model_cfg`` and
``preprocess_cfg``) plus the weights (``open_clip_model.safetensors`` or another file open_clip
finds); the tokenizer comes from the same config (the bundled BPE for OpenAI-style text towers).
Images are quantised to uint8 like every other metric input, gray is repeated to RGB, resized to
the model's image size (bicubic, antialias; square images, so no crop) and normalised with the
config's mean and std.

Reported: ``clip_cosine``, the mean cosine similarity of image and prompt embeddings (what
DMD2 / SiD-LSG / GigaGAN report, about 0.3 for good models), and ``clip_score`` = mean of
100 * max(cos, 0) (torchmetrics ``CLIPScore`` / Hessel et al. 2021 without the 2.5 weight).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contract import StepdistillError
from .features import file_sha256, quantize


class ClipScorer:
    """Image-text cosine similarity with an open_clip model loaded from ``folder``."""

    def __init__(self, folder: str | Path, device="cpu"):
        import open_clip

        folder = Path(folder)
        if not (folder / "open_clip_config.json").is_file():
            raise StepdistillError(f"--clip-model {str(folder)!r} must be a folder with open_clip_config.json and weights")
        try:
            self.model = open_clip.create_model(f"local-dir:{folder}", device=device).eval().requires_grad_(False)
            self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            raise StepdistillError(f"cannot load open_clip model from {folder}: {str(e).splitlines()[0]}") from None
        pre = open_clip.get_model_preprocess_cfg(self.model)
        size = pre.get("size", 224)
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
        self.device = device
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
        self.protocol = {"clip_model": str(folder), "clip_weights_sha256": file_sha256(str(weights[0])) if weights else None,
                         "clip_image_size": list(self.size), "clip_resize": "bicubic antialias from uint8"}

    def _pixels(self, images: Tensor) -> Tensor:
        x = quantize(images).float() / 255.0  # [N, C, H, W] in [0, 1]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: list[str], batch_size: int = 256) -> Tensor:
        """Per-sample cosine similarity [N] of images [N, C, H, W] in [-1, 1] and their prompts."""
        if len(prompts) != len(images):
            raise StepdistillError(f"CLIP score needs one prompt per image ({len(images)} images, {len(prompts)} prompts)")
        out = []
        for i in range(0, len(images), batch_size):
            img = F.normalize(self.model.encode_image(self._pixels(images[i:i + batch_size])).float(), dim=-1)  # [b, E]
            txt = F.normalize(self.model.encode_text(self.tokenizer(prompts[i:i + batch_size]).to(self.device)).float(), dim=-1)
            out.append((img * txt).sum(-1).cpu())
        return torch.cat(out)

    def score(self, images: Tensor, prompts: list[str]) -> dict:
        cos = self.cosine(images, prompts)
        return {"clip_cosine": float(cos.mean()), "clip_score": float((100 * cos).clamp_min(0).mean())}
