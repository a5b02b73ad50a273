"""Feature networks for FID / KID / precision-recall, as torchmetrics ``feature=`` modules.

Every feature network takes **uint8 images** [N, C, H, W] (torchmetrics' convention with
``normalize=False``) and returns features [N, D]; it carries ``num_features`` (so torchmetrics
needs no dummy forward), a ``sha256`` of its weights and a ``protocol`` dict (what the report
writes next to every number). Images reach them through ``quantize``: round-and-clamp of
[-1, 1] floats to uint8, as a PNG writer would store them (torchmetrics' own ``normalize=True``
path truncates with ``(x * 255).byte()`` instead; see shared/reference/ecosystem.md section 8.1).

* ``DigitsFeatures``: the shipped digits classifier's penultimate layer (D = 128); RGB is
  averaged to gray, other sizes are resized to 16 x 16 (bilinear, antialias).
* ``DigitsLayerFeatures``: the artifact-sensitive view of the same network (statistics pooled from
  several layers; grain and blur move it where the penultimate features barely notice them).
* ``InceptionFeatures``: torchmetrics' ``NoTrainInceptionV3`` (the TF-FID Inception, 2048-d pool
  features) from a local weights file only; it resizes to 299 itself, with torch's antialiased
  bilinear (``antialias=True``, torchmetrics' default) or the TF1-compatible resize
  (``antialias=False``, comparable to TF-FID / torch-fidelity / ADM / EDM numbers). Gray images
  are repeated to 3 channels. Needs the ``torch-fidelity`` package; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import StepdistillError

QUANTIZATION = "uint8, round((x + 1) * 127.5) clamped to [0, 255]"


def quantize(images: Tensor) -> Tensor:
    """Images in [-1, 1] [N, C, H, W] -> uint8 [N, C, H, W] (round, clamp), as saved to PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def dequantize(images: Tensor) -> Tensor:
    """uint8 [N, C, H, W] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


@lru_cache(maxsize=16)
def file_sha256(path: str) -> str:
    """sha256 hex digest of a file (cached per path for the process)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DigitsFeatures(nn.Module):
    """Penultimate features [N, 128] of the digits classifier, from uint8 images [N, C, H, W]."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from .digits_classifier import WEIGHTS_NAME, default_path, load_digits_classifier

        folder = Path(path or default_path())
        try:
            self.net = load_digits_classifier(folder)
        except FileNotFoundError as e:
            raise StepdistillError(str(e)) from None
        self.num_features = self.net.num_features
        self.sha256 = file_sha256(str(folder / WEIGHTS_NAME))
        self.resolution = self.net.resolution
        self.protocol = {"feature_network": "digits-classifier penultimate (assets/feature_net)",
                         "feature_sha256": self.sha256, "num_features": self.num_features,
                         "resize": f"{self.resolution}x{self.resolution} bilinear antialias (only if the size differs)",
                         "color": "RGB averaged to gray", "quantization": QUANTIZATION}

    def to_input(self, images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> the classifier's input [N, 1, R, R] in [-1, 1]."""
        x = dequantize(images).mean(1, keepdim=True)  # [N, 1, H, W]
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(self.to_input(images))  # [N, 128]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted digit [N] of uint8 images."""
        return self.net.predict(self.to_input(images))


class DigitsLayerFeatures(DigitsFeatures):
    """An artifact-sensitive view: statistics pooled from several layers of the digits classifier.

    The penultimate features of a classifier trained with noise augmentation are nearly blind to
    grain and blur (on 800 vs 797 real digits: FID 0.95 real-vs-real, 0.99 with Gaussian pixel noise
    of std 0.1, i.e. +4%; 2.44 with a 3x3 blur). Here each image is described by the spatial mean and standard deviation
    of every channel of the first convolution (before its ReLU), of each conv block's output (before
    pooling), and by the penultimate features; each group is divided by its typical spread on the
    real digits (mean over dimensions of the per-dimension std on all 1797 digits, computed once)
    and by sqrt(its size), so every group weighs about the same, then all are multiplied by 10.
    The same noise then raises this view's FID from 9.08 to 17.85 (+97%), the blur to 131.9.
    """

    SCALE = 10.0

    def __init__(self, path: str | Path | None = None):
        super().__init__(path)
        from ..training.data.digits import load_digits_images

        self.num_features = 2 * self.net.conv[0][0].out_channels + sum(2 * block[2].out_channels for block in self.net.conv) \
            + self.net.num_features
        real = load_digits_images()[0].float()  # [1797, 1, 16, 16] in [-1, 1]
        groups = self._groups(real)
        self.spread = [float(g.std(0).mean()) for g in groups]
        self.protocol = self.protocol | {
            "feature_network": "digits-classifier layer statistics (assets/feature_net): per-channel spatial mean and std "
                               "of conv1 (pre-ReLU) and of each conv block's output, plus the penultimate features; each "
                               "group / (its mean per-dimension std on the 1797 digits * sqrt(size)) * 10",
            "num_features": self.num_features}

    def _groups(self, x: Tensor) -> list[Tensor]:
        """[mean, std] per channel of conv1 (pre-ReLU) and of each block's output, then the penultimate features."""
        def stats(h: Tensor) -> Tensor:
            return torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)

        net = self.net
        x = net._check(x)
        groups = [stats(net.conv[0][0](x))]
        h = x
        for block in net.conv:
            h = block[:4](h)  # conv, ReLU, conv, ReLU
            groups.append(stats(h))
            h = block[4](h)  # pooling
        groups.append(net.fc(h))
        return groups

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        groups = self._groups(self.to_input(images))
        return torch.cat([g / (s * g.shape[1] ** 0.5) for g, s in zip(groups, self.spread)], 1) * self.SCALE  # [N, D]


class InceptionFeatures(nn.Module):
    """2048-d Inception-v3 pool features (torchmetrics / torch-fidelity network) from a local file."""

    def __init__(self, weights_path: str | Path, antialias: bool = True):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise StepdistillError(f"--inception-weights {str(path)!r} is not a file (expected the torch-fidelity "
                                   "weights-inception-2015-12-05-6726825d.pth)")
        try:
            import torch_fidelity.feature_extractor_inceptionv3 as tfi
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError:
            raise StepdistillError("Inception features need torch-fidelity: pip install 'stepdistill[inception]'") from None
        state = inception_state_dict(path)
        # torch-fidelity reads the file itself with torch.load(weights_only=False), which would unpickle
        # arbitrary objects; hand it the state dict we read safely instead (only for this constructor call).
        unsafe_load = tfi.torch.load
        tfi.torch.load = lambda *_a, **_k: state
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path), antialias=antialias)
        except RuntimeError as e:
            raise StepdistillError(f"--inception-weights {str(path)!r} does not fit torch-fidelity's Inception-v3: "
                                   f"{str(e).splitlines()[0]}") from None
        finally:
            tfi.torch.load = unsafe_load
        self.num_features = 2048
        self.sha256 = file_sha256(str(path))
        resize = "torch bilinear antialias" if antialias else "TF1-compatible bilinear (torch-fidelity)"
        self.protocol = {"feature_network": f"Inception-v3 pool3 ({path.name})", "feature_sha256": self.sha256,
                         "num_features": 2048, "resize": f"299x299 {resize}", "color": "gray repeated to RGB",
                         "quantization": QUANTIZATION}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images if images.shape[1] == 3 else images[:, :1].expand(-1, 3, -1, -1)  # [N, 3, H, W] uint8
        return self.net(x.contiguous())  # [N, 2048]


def inception_state_dict(path: Path) -> dict:
    """Inception weights from ``.safetensors`` or a ``.pth`` read with the weights-only unpickler."""
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise StepdistillError(f"--inception-weights {str(path)!r} is not a plain weights file (refusing to unpickle "
                               f"anything else): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise StepdistillError(f"--inception-weights {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


class Precomputed(nn.Module):
    """Identity ``feature=`` module: feeds features computed once (and cached) to torchmetrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def feature_network(name: str = "digits", inception_weights: str | None = None, antialias: bool = True) -> nn.Module:
    """``digits``, ``digits-layers`` (the artifact-sensitive view) or ``inception`` (needs ``inception_weights``)."""
    if name == "digits":
        return DigitsFeatures()
    if name == "digits-layers":
        return DigitsLayerFeatures()
    if name == "inception":
        if not inception_weights:
            raise StepdistillError("feature network 'inception' needs --inception-weights PATH (nothing is downloaded)")
        return InceptionFeatures(inception_weights, antialias)
    raise StepdistillError(f"unknown feature network {name!r}; expected digits, digits-layers or inception")


@torch.no_grad()
def extract(net: nn.Module, images_uint8: Tensor, batch_size: int = 500) -> Tensor:
    """Features [N, D] (float32) of uint8 images, in batches."""
    return torch.cat([net(chunk).float() for chunk in images_uint8.split(batch_size)])
