"""Per-sample seeds and balanced, seeded conditions.

Sample ``i`` of an evaluation owns the seed ``base_seed + i``: its initial noise (and any
re-noising noise of a stochastic few-step sampler) comes from ``torch.Generator`` seeded with
it, so a sample does not depend on the batch size, the batch it lands in, or the number of
processes. Its condition depends only on ``(base_seed, i)`` too:

* class labels: block ``b = i // C`` of C consecutive samples is a seeded permutation of the
  C classes, so any multiple of C samples is exactly balanced (within 1 otherwise), and the first
  n samples of a larger evaluation are the same n samples;
* digit prompts: the label as above, plus a caption template drawn with the sample's own
  generator (``stepdistill.training.data.digits.CAPTION_TEMPLATES``);
* a user prompt list: the same block permutation over the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LABEL_STREAM = 1 << 40  # seed offsets: condition streams never collide with noise seeds
PROMPT_STREAM = 1 << 41


@dataclass
class Conditions:
    """What each sample asks for: class labels [N] and/or prompts (len N); both None = unconditional."""

    labels: Tensor | None = None
    prompts: list[str] | None = None

    def take(self, idx: list[int]) -> "Conditions":
        return Conditions(None if self.labels is None else self.labels[idx],
                          None if self.prompts is None else [self.prompts[i] for i in idx])


def sample_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_sample_randn(generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """[B, *shape] standard normal: row b from generators[b] (advances each generator)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def balanced_indices(indices: list[int], count: int, base_seed: int) -> Tensor:
    """For each sample index, an item in [0, count): seeded permutation per block of ``count``."""
    perms: dict[int, Tensor] = {}
    out = []
    for i in indices:
        block = i // count
        if block not in perms:
            g = torch.Generator().manual_seed(base_seed + LABEL_STREAM + block)
            perms[block] = torch.randperm(count, generator=g)
        out.append(int(perms[block][i % count]))
    return torch.tensor(out, dtype=torch.long)


def digit_prompts(labels: Tensor, indices: list[int], base_seed: int) -> list[str]:
    """A caption per (label, sample): template drawn with the sample's own generator."""
    from ..training.data.digits import caption_for

    return [caption_for(int(y), torch.Generator().manual_seed(base_seed + PROMPT_STREAM + i))
            for y, i in zip(labels, indices)]


def make_conditions(n: int, base_seed: int, num_classes: int = 0, prompts: str | list[str] | None = None) -> Conditions:
    """Conditions of samples 0..n-1.

    Args:
        num_classes: > 0 for class-conditional models (labels balanced over the classes).
        prompts: None (no prompts), "digits" (digit captions; labels over 10 digits) or a list (the user's
            --prompts: block permutation over the list, no labels).
    """
    idx = list(range(n))
    if prompts == "text":  # sources.TEXT: a prompt-conditioned model the user gave no prompts for
        from ..contract import StepdistillError

        raise StepdistillError("this model is text-to-image: give --prompts FILE (one prompt per line)")
    if prompts == "digits":
        labels = balanced_indices(idx, 10, base_seed)
        return Conditions(labels, digit_prompts(labels, idx, base_seed))
    if prompts:
        order = balanced_indices(idx, len(prompts), base_seed)
        return Conditions(None, [prompts[int(j)] for j in order])
    if num_classes:
        return Conditions(balanced_indices(idx, num_classes, base_seed), None)
    return Conditions()
