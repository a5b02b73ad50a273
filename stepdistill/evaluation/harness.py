"""One evaluation: seeded samples of a ``ModelSampler`` -> metrics, cost and the protocol record."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..contract import StepdistillError
from .cost import NFECounter, measure_cost
from .features import extract, feature_network, quantize
from .metrics import accuracy, distribution_metrics
from .reference import DIGITS_SETS, Reference, reference_features
from .seeding import Conditions, make_conditions
from .sources import DIGITS, ModelSampler

DISTRIBUTION_KEYS = ("fid", "kid", "kid_std", "precision", "recall", "mean_pairwise_distance", "vendi")


@dataclass
class EvalSettings:
    """The protocol knobs of one evaluation (all recorded with every number)."""

    num_samples: int = 1000  # generated samples, seeds base_seed + 0 .. base_seed + N - 1
    seed: int = 0  # base seed
    batch_size: int = 100  # sampling batch (results do not depend on it)
    reference: str = "digits"  # digits | digits-train | digits-test | image folder
    feature_net: str = "digits"  # digits | inception
    inception_weights: str | None = None  # local torch-fidelity Inception weights file
    inception_antialias: bool = True  # torchmetrics default; False = TF1-compatible resize
    pr_k: int = 3  # k of improved precision/recall
    kid_subsets: int = 50  # KID subsets (subset size min(1000, N))
    cost: bool = True  # measure latency / throughput / memory
    cost_batch_size: int = 64  # batch size of the throughput measurement
    cost_repeats: int = 3  # timed calls (median)
    grid_samples: int = 80  # samples in the PNG grid (sorted by class: 8 per class for 80)
    cache_dir: str | None = None  # reference feature cache (default ~/.cache/stepdistill/reference)
    prompts: str | None = None  # --prompts FILE of prompt-conditioned models (recorded; the list comes with evaluate)
    artifact_view: bool = True  # digits features: also FID / recall in the layer-statistics view (fid_layers, recall_layers)

    def check(self) -> None:
        if self.num_samples < 2:
            raise StepdistillError(f"--num-samples must be at least 2 (FID needs two samples), got {self.num_samples}")
        if self.batch_size < 1:
            raise StepdistillError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.cost_batch_size < 1:
            raise StepdistillError(f"--cost-batch-size must be at least 1, got {self.cost_batch_size}")
        if self.num_samples <= self.pr_k:
            raise StepdistillError(f"--num-samples must exceed k = {self.pr_k} of precision/recall")


def generate_samples(sampler: ModelSampler, conds: Conditions, n: int, seed: int, batch_size: int,
                     progress: Callable[[int], None] | None = None) -> Tensor:
    """Samples 0..n-1 (seed + i each) in batches: [n, C, H, W] in [-1, 1] on CPU."""
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        images = sampler.generate([seed + i for i in idx], conds.take(idx)).float().cpu()
        if not torch.isfinite(images).all():
            bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
            raise StepdistillError(f"{sampler.label}: {bad} of samples {idx[0]}..{idx[-1]} contain NaN or inf "
                                   "(a non-finite guidance scale, weights or schedule?); no metrics computed")
        out.append(images)
        if progress:
            progress(len(idx))
    return torch.cat(out)


def digits_model(sampler: ModelSampler) -> bool:
    """Whether a sampler's images are digits: sampled on the digit captions (or from a digit-caption teacher
    with other prompts), or class-conditional over the digits classifier's 10 classes."""
    if sampler.prompts == DIGITS or sampler.info.get("digits_teacher"):
        return True
    return sampler.prompts is None and sampler.num_classes == 10


def conditions_protocol(sampler: ModelSampler, prompts_file: str | None) -> str:
    """The conditions of a sampler's samples, in words (recorded per row)."""
    if sampler.prompts == DIGITS:
        return "digit captions: digit balanced per block of 10 samples (seeded permutation), template drawn per sample"
    if isinstance(sampler.prompts, list):
        import hashlib

        digest = hashlib.sha256("\n".join(sampler.prompts).encode()).hexdigest()[:16]
        return (f"prompts from {prompts_file or 'a list'} ({len(sampler.prompts)} prompts, sha256 {digest}): seeded "
                f"permutation per block of {len(sampler.prompts)} samples")
    if sampler.num_classes:
        return f"class labels: seeded permutation per block of {sampler.num_classes} samples (balanced)"
    return "unconditional"


def summary(record: dict) -> str:
    """One log line of a record's numbers (skipped metrics left out)."""
    parts = [f"{name} {record[key]:{fmt}}" for name, key, fmt in (
        ("FID", "fid", ".3f"), ("FID-layers", "fid_layers", ".2f"), ("P", "precision", ".3f"), ("R", "recall", ".3f"), ("acc", "accuracy", ".3f"),
        ("CLIP", "clip_score", ".2f"), ("NFE", "nfe", "g")) if record.get(key) is not None]
    skipped = record.get("protocol", {}).get("metrics_skipped") or {}
    return "  ".join(parts) + (f"  (skipped: {', '.join(skipped)})" if skipped else "")


def environment(device: torch.device) -> dict:
    """Package versions and the device, recorded with every result."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("stepdistill", "torch", "diffusers", "torchmetrics", "open_clip_torch", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
    return {"versions": versions, "python": platform.python_version(), "device": name}


def grid_order(labels: Tensor | None, count: int) -> list[int]:
    """Indices of the first ``count`` samples, sorted by class label (stable) for a class-per-row grid."""
    idx = list(range(count))
    return idx if labels is None else sorted(idx, key=lambda i: int(labels[i]))


def metric_plan(settings: EvalSettings, clip: bool, model: str, digits: bool, prompts: str | list | None) -> dict[str, str]:
    """Metrics a model cannot get under these settings -> why (one-line errors for half-given pieces).

    Digits models get every metric as before. Any other model (a text-to-image model with the
    user's prompts, another class count, unconditional) gets FID / KID / precision / recall /
    diversity only in Inception features against an image folder, no digits accuracy, and CLIP
    score with --clip-model; a model nothing can measure is a one-line error.
    """
    s, skipped = settings, {}
    what = f"text-to-image model {model!r}" if isinstance(prompts, list) else f"{model!r} (not a digits model)"
    if not digits:
        folder, inception = s.reference not in DIGITS_SETS, s.feature_net == "inception"
        if inception and not folder:
            raise StepdistillError(f"FID on {what} needs --reference <image folder> (the digits sets are the digits "
                                   "models' data) with --inception-weights PATH")
        if folder and not inception:
            raise StepdistillError(f"FID on {what} needs --inception-weights PATH (the digits features describe 16x16 "
                                   "digits only) with --reference <image folder>")
        if not folder:
            skipped["fid"] = ("FID, KID, precision, recall, diversity: not a digits model; they need --reference "
                              "<image folder> and --inception-weights PATH")
        skipped["accuracy"] = "the digits classifier's accuracy is for digits models (10 digit classes or digit captions)"
    elif prompts is not None and prompts != DIGITS:
        skipped["accuracy"] = "the user's prompts carry no digit labels"
    has_prompts = prompts is not None
    if has_prompts and not clip:
        skipped["clip_score"] = "CLIP score needs --clip-model PATH (a local open_clip folder)"
    if not digits and "fid" in skipped and not (has_prompts and clip):
        raise StepdistillError(f"nothing measures the quality of {what}: give --clip-model PATH (CLIP score against "
                               "the prompts) and/or --reference <image folder> with --inception-weights PATH (FID)")
    return skipped


class Evaluator:
    """Holds the feature network, the reference features and optional CLIP scorer across models."""

    def __init__(self, settings: EvalSettings, device="cpu", clip_model: str | None = None, log=print):
        settings.check()
        self.settings, self.device, self.log = settings, torch.device(device), log
        self.features = feature_network(settings.feature_net, settings.inception_weights, settings.inception_antialias)
        self.reference: Reference = reference_features(settings.reference, self.features, settings.cache_dir, log)
        self.layers = self.layer_reference = None
        if settings.artifact_view and settings.feature_net == "digits":  # the artifact-sensitive second view
            from .features import DigitsLayerFeatures

            self.layers = DigitsLayerFeatures()
            self.layer_reference = reference_features(settings.reference, self.layers, settings.cache_dir, log)
        self._classifier = None
        self.clip = None
        if clip_model:
            from .clip import ClipScorer

            self.clip = ClipScorer(clip_model, device)

    @property
    def classifier(self):
        """The digits classifier (conditional accuracy), whatever the FID feature network."""
        if self._classifier is None:
            from .features import DigitsFeatures

            self._classifier = self.features if type(self.features).__name__ == "DigitsFeatures" else DigitsFeatures()
        return self._classifier

    def protocol(self) -> dict:
        s = self.settings
        return {"num_samples": s.num_samples, "seeds": f"base_seed + i for i in [0, {s.num_samples}), base_seed = {s.seed}",
                "noise": "one torch.Generator per sample (CPU), initial and re-noising noise",
                "conditions": "class labels: seeded permutation per block of C samples (balanced); prompts: digit captions, "
                              "template drawn per sample",
                "reference": s.reference, "reference_count": len(self.reference.features),
                "reference_key": self.reference.key, **self.features.protocol,
                "artifact_view": self.layers.protocol["feature_network"] if self.layers is not None else None,
                "precision_recall_k": s.pr_k, "kid_subsets": s.kid_subsets,
                "kid_subset_size": min(1000, s.num_samples, len(self.reference.features)),
                **(self.clip.protocol if self.clip else {}), **environment(self.device)}

    def metric_plan(self, model: str, digits: bool, prompts: str | list | None) -> dict[str, str]:
        return metric_plan(self.settings, self.clip is not None, model, digits, prompts)

    def evaluate(self, sampler: ModelSampler, grid_path: Path | None = None) -> dict:
        """Metrics, NFE, cost and protocol of one sampler."""
        s = self.settings
        skipped = self.metric_plan(sampler.model, digits_model(sampler), sampler.prompts)  # half-given pieces fail now
        conds = make_conditions(s.num_samples, s.seed, sampler.num_classes, sampler.prompts)
        with NFECounter(sampler.networks) as counter:
            images = generate_samples(sampler, conds, s.num_samples, s.seed, s.batch_size)
        q = quantize(images)  # [N, C, H, W] uint8
        record = {"model": sampler.model, "kind": sampler.kind, "solver": sampler.solver, "steps": sampler.steps,
                  "guidance_scale": sampler.guidance_scale, "label": sampler.label,
                  "distilled_guidance_scale": sampler.info.get("distilled_guidance_scale"),
                  "nfe": counter.rows / s.num_samples if sampler.networks else None}
        if "fid" in skipped:
            record |= dict.fromkeys(DISTRIBUTION_KEYS)
        else:
            record |= distribution_metrics(self.reference.features, extract(self.features, q), s.pr_k, s.kid_subsets, s.seed)
            if self.layers is not None:
                view = distribution_metrics(self.layer_reference.features, extract(self.layers, q), s.pr_k, s.kid_subsets, s.seed)
                record |= {"fid_layers": view["fid"], "precision_layers": view["precision"], "recall_layers": view["recall"]}
        use_labels = conds.labels is not None and "accuracy" not in skipped
        record["accuracy"] = accuracy(self.classifier.predict(q), conds.labels) if use_labels else None
        if self.clip is not None and conds.prompts is not None:
            record |= self.clip.score(images, conds.prompts)
        if s.cost:
            n = min(s.cost_batch_size, s.num_samples)
            record |= measure_cost(lambda seeds: sampler.generate([s.seed + i for i in seeds], conds.take(list(seeds))),
                                   n, self.device, s.cost_repeats)
        if grid_path is not None:
            from ..viz import save_samples

            order = grid_order(conds.labels, min(s.grid_samples, s.num_samples))
            save_samples(images[order], Path(grid_path), nrow=8)
            record["sample_grid"] = str(grid_path)
        record["info"] = sampler.info
        record["teacher"] = sampler.info.get("teacher")
        record["train_seconds"] = (sampler.info.get("training") or {}).get("seconds")
        record["protocol"] = self.protocol() | {"conditions": conditions_protocol(sampler, s.prompts), "metrics_skipped": skipped}
        record["settings"] = asdict(s)
        return record
