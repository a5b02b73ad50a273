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
from .reference import Reference, reference_features
from .seeding import Conditions, make_conditions
from .sources import ModelSampler


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

    def check(self) -> None:
        if self.num_samples < 2:
            raise StepdistillError(f"--num-samples must be at least 2 (FID needs two samples), got {self.num_samples}")
        if self.batch_size < 1 or self.cost_batch_size < 1:
            raise StepdistillError("--batch-size must be at least 1")
        if self.num_samples <= self.pr_k:
            raise StepdistillError(f"--num-samples must exceed k = {self.pr_k} of precision/recall")


def generate_samples(sampler: ModelSampler, conds: Conditions, n: int, seed: int, batch_size: int,
                     progress: Callable[[int], None] | None = None) -> Tensor:
    """Samples 0..n-1 (seed + i each) in batches: [n, C, H, W] in [-1, 1] on CPU."""
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        out.append(sampler.generate([seed + i for i in idx], conds.take(idx)).float().cpu())
        if progress:
            progress(len(idx))
    return torch.cat(out)


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


class Evaluator:
    """Holds the feature network, the reference features and optional CLIP scorer across models."""

    def __init__(self, settings: EvalSettings, device="cpu", clip_model: str | None = None, log=print):
        settings.check()
        self.settings, self.device, self.log = settings, torch.device(device), log
        self.features = feature_network(settings.feature_net, settings.inception_weights, settings.inception_antialias)
        self.reference: Reference = reference_features(settings.reference, self.features, settings.cache_dir, log)
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
                "precision_recall_k": s.pr_k, "kid_subsets": s.kid_subsets,
                "kid_subset_size": min(1000, s.num_samples, len(self.reference.features)),
                **(self.clip.protocol if self.clip else {}), **environment(self.device)}

    def evaluate(self, sampler: ModelSampler, grid_path: Path | None = None) -> dict:
        """Metrics, NFE, cost and protocol of one sampler."""
        s = self.settings
        conds = make_conditions(s.num_samples, s.seed, sampler.num_classes, sampler.prompts)
        with NFECounter(sampler.networks) as counter:
            images = generate_samples(sampler, conds, s.num_samples, s.seed, s.batch_size)
        q = quantize(images)  # [N, C, H, W] uint8
        record = {"model": sampler.model, "kind": sampler.kind, "solver": sampler.solver, "steps": sampler.steps,
                  "guidance_scale": sampler.guidance_scale, "label": sampler.label,
                  "nfe": counter.rows / s.num_samples if sampler.networks else None,
                  **distribution_metrics(self.reference.features, extract(self.features, q), s.pr_k, s.kid_subsets, s.seed)}
        record["accuracy"] = accuracy(self.classifier.predict(q), conds.labels) if conds.labels is not None else None
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
        record["protocol"] = self.protocol()
        record["settings"] = asdict(s)
        return record
