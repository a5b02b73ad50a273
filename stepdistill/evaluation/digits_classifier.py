"""The digits feature network: a small CNN classifier on 1x16x16 digits in [-1, 1].

It plays the role Inception plays for ImageNet-scale FID on the embedded benchmark:
``forward`` gives class logits (conditional accuracy of class- or prompt-conditioned samples)
and ``features`` gives the penultimate activations (FID, precision/recall).

Shipped weights: ``assets/feature_net/model.safetensors`` with ``config.json`` (architecture
arguments, the data split seed and the measured held-out accuracy), trained by
``train/teachers/train_classifier.py``. Pure torch + safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + ReLU layers, then 2x2 max pooling (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class DigitsClassifier(nn.Module):
    """CNN on [N, 1, R, R] images in [-1, 1]; ``features`` are the D = ``num_features`` penultimate units."""

    def __init__(self, channels: tuple[int, ...] = (32, 64), num_features: int = 128, num_classes: int = 10,
                 resolution: int = 16, in_channels: int = 1, dropout: float = 0.3):
        super().__init__()
        self.config = dict(channels=list(channels), num_features=num_features, num_classes=num_classes,
                           resolution=resolution, in_channels=in_channels, dropout=dropout)
        widths = [in_channels, *channels]
        self.conv = nn.Sequential(*[_conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])])
        side = resolution // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, num_features), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.resolution = resolution
        self.in_channels = in_channels

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(
                f"DigitsClassifier expects [N, {self.in_channels}, {self.resolution}, {self.resolution}] images in "
                f"[-1, 1], got shape {tuple(x.shape)}; convert RGB to gray (mean over channels) and resize first"
            )
        return x.float()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [N, D] of images x [N, 1, R, R] in [-1, 1]."""
        return self.fc(self.conv(self._check(x)))  # [N, D]

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N, num_classes] of images x [N, 1, R, R] in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))  # [N, 10]

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Predicted labels [N] (eval mode, batched)."""
        return torch.cat([self(chunk).argmax(-1) for chunk in x.split(batch_size)])


def default_path() -> Path:
    """The packaged digits feature network (or $STEPDISTILL_ASSETS/feature_net)."""
    from ..resources import assets_dir

    return assets_dir() / "feature_net"


def read_config(path: str | Path | None = None) -> dict:
    """The shipped config.json: {"architecture": {...}, "split_seed", "test_accuracy", ...}."""
    return json.loads((Path(path or default_path()) / CONFIG_NAME).read_text())


def save_digits_classifier(model: DigitsClassifier, path: str | Path, extra: dict | None = None) -> None:
    """Write model.safetensors and config.json (architecture + ``extra`` metadata) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps({"architecture": model.config, **(extra or {})}, indent=2) + "\n")


def load_digits_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped digits classifier in eval mode with frozen weights (default: assets/feature_net/)."""
    from safetensors.torch import load_file

    path = Path(path or default_path())
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no digits classifier at {path} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); "
            "train one with: python train/teachers/train_classifier.py --out assets/feature_net"
        )
    model = DigitsClassifier(**read_config(path)["architecture"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model.to(device).eval().requires_grad_(False)
