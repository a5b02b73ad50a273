"""Real reference sets and their cached features.

The features of a reference set are stored once per protocol as
``<cache>/<name>-<key>.safetensors`` (features [N, D] float32, plus the FID sums in float64)
with ``<name>-<key>.json`` beside it (the protocol in words). ``key`` is a sha256 of the
protocol: feature network hash and settings (resize, quantisation, dimension), the reference
set and its size. Change any of them and the cache misses; nothing is pickled.

Reference sets: ``digits`` (all 1797 scikit-learn digits at 16 x 16, preprocessed by
``stepdistill.training.data.digits``), ``digits-train`` (1437), ``digits-test`` (360), or a folder of
PNG/JPEG images (all of one size).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor

from ..contract import StepdistillError
from .features import extract, quantize

DIGITS_SETS = {"digits": "all", "digits-train": "train", "digits-test": "test"}


@dataclass
class Reference:
    name: str
    features: Tensor  # [N, D] float32
    labels: Tensor | None  # [N] for labelled sets
    protocol: dict
    key: str
    cache_hit: bool
    path: Path | None = None


def default_cache_dir() -> Path:
    """$STEPDISTILL_CACHE/reference, else ~/.cache/stepdistill/reference."""
    root = os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill"
    return Path(root) / "reference"


def load_real_images(name: str) -> tuple[Tensor, Tensor | None, str]:
    """(images [N, C, H, W] in [-1, 1], labels or None, a fingerprint of the source)."""
    if name in DIGITS_SETS:
        from ..training.data.digits import load_digits_images

        images, labels = load_digits_images(DIGITS_SETS[name], resolution=16)
        return images, labels, f"sklearn digits split={DIGITS_SETS[name]} split_seed=0 resolution=16 bilinear"
    folder = Path(name)
    if not folder.is_dir():
        raise StepdistillError(f"--reference {name!r}: expected digits, digits-train, digits-test or an image folder")
    from PIL import Image

    from ..training.data import load_image_folder

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise StepdistillError(f"reference folder {name!r} has no .png/.jpg images")
    with Image.open(files[0]) as im:
        c, (w, h) = (1 if im.mode in ("L", "I", "1") else 3), im.size
    images = load_image_folder(folder, (c, h, w))
    listing = hashlib.sha256("\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    return images, None, f"image folder {folder.resolve()} ({len(files)} files, listing sha256 {listing[:16]})"


def protocol_key(protocol: dict) -> str:
    """Short sha256 of a protocol dict (sorted JSON)."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]


def reference_protocol(name: str, source: str, count: int, feature_protocol: dict) -> dict:
    return {"reference": name, "source": source, "count": count, **feature_protocol}


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).name or "ref")[:40]


def reference_features(name: str, feature_net, cache_dir: str | Path | None = None,
                       log: Callable[[str], None] = print) -> Reference:
    """Features of a reference set under ``feature_net``, from the cache when the protocol matches."""
    from safetensors.torch import load_file, save_file

    images, labels, source = load_real_images(name)
    protocol = reference_protocol(name, source, len(images), feature_net.protocol)
    key = protocol_key(protocol)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    stem = root / f"{_safe_name(name)}-{key}"
    meta_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if meta_path.is_file() and tensor_path.is_file() and json.loads(meta_path.read_text()).get("protocol") == protocol:
        tensors = load_file(str(tensor_path))
        log(f"reference {name}: cached features {tensor_path}")
        return Reference(name, tensors["features"], tensors.get("labels"), protocol, key, True, tensor_path)
    feats = extract(feature_net, quantize(images))  # [N, D]
    root.mkdir(parents=True, exist_ok=True)
    tensors = {"features": feats.contiguous(), "features_sum": feats.double().sum(0),
               "features_cov_sum": feats.double().T @ feats.double()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    save_file(tensors, str(tensor_path))
    meta_path.write_text(json.dumps({"key": key, "protocol": protocol}, indent=1) + "\n")
    log(f"reference {name}: {len(feats)} images -> features cached at {tensor_path}")
    return Reference(name, feats, labels, protocol, key, False, tensor_path)
