"""scikit-learn's 8x8 handwritten digits as small images and captions (ships offline).

Every part of the project (embedded teachers, the digits feature network, the embedded
benchmark) reads the digits through ``load_digits_images`` so that preprocessing and the
train/test split agree everywhere:

- pixel values 0..16 are mapped linearly to [-1, 1], then
- the 8x8 images are upsampled to ``resolution`` with bilinear interpolation
  (``align_corners=False``),
- the split is a fixed stratified 80/20 split (seed 0 by default): 1437 train, 360 test.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.2
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "a scanned image of the digit {word}",
    "a hand-drawn {digit}",
    "the digit {digit}",
    "a small grayscale picture of a {word}",
    "someone wrote the number {word}",
    "a pixelated handwritten {digit}",
]


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] with values 0..16, labels [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 (train, test) index arrays, each sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def to_model_range(images: np.ndarray | Tensor, resolution: int = 16) -> Tensor:
    """8x8 digit images with values 0..16 -> [N, 1, R, R] in [-1, 1] (bilinear upsampling)."""
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [N, 1, 8, 8]
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)  # [N, 1, R, R]
    return x.clamp(-1.0, 1.0)


def load_digits_images(split: str = "all", resolution: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The digits as images.

    Args:
        split: "all" (1797), "train" (1437) or "test" (360); a stratified split fixed by ``seed``.
        resolution: output side length; 8 keeps the original pixels.
        seed: the split seed. Keep 0 so that results across the project are comparable.

    Returns:
        images: FloatTensor [N, 1, R, R] in [-1, 1].
        labels: LongTensor [N] in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    raw, labels = _raw_digits()
    if split != "all":
        train, test = split_indices(labels, seed)
        keep = train if split == "train" else test
        raw, labels = raw[keep], labels[keep]
    return to_model_range(raw, resolution), torch.from_numpy(labels)


def caption_for(label: int, rng: torch.Generator | random.Random | np.random.Generator | None = None) -> str:
    """A caption for one digit label, its template drawn with ``rng`` (a torch, numpy or stdlib generator)."""
    k = _randint(len(CAPTION_TEMPLATES), rng)
    label = int(label)
    return CAPTION_TEMPLATES[k].format(word=DIGIT_WORDS[label], digit=label)


def all_captions(label: int) -> list[str]:
    """Every caption of one digit label, in template order."""
    return [t.format(word=DIGIT_WORDS[int(label)], digit=int(label)) for t in CAPTION_TEMPLATES]


def _randint(n: int, rng) -> int:
    """A uniform integer in [0, n) from any of the supported generator types."""
    if rng is None:
        return random.randrange(n)
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, n, (1,), generator=rng))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)
