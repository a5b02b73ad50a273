"""Conditions: where a batch's cond and its null cond come from, and CFG as a wrapper.

A conditioner turns a batch size and a generator into ``(cond, null_cond)``: two dicts the
adapters read (``class_labels``; ``prompt_embeds`` and friends). ``null_cond`` is the matching
unconditional input for classifier-free guidance, or None when the model has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from .contract import Cond, Denoiser, StepdistillError


class Conditioner(Protocol):
    def __call__(self, n: int, generator: torch.Generator) -> tuple[dict, dict | None]: ...


class Unconditional:
    """No conditioning at all (unconditional models)."""

    def __call__(self, n: int, generator: torch.Generator) -> tuple[dict, None]:
        return {}, None


@dataclass
class ClassLabels:
    """Uniform class labels in [0, num_classes); the null label is ``null_class``."""

    num_classes: int
    null_class: int | None = None  # index used for the unconditional branch (None: no CFG)
    device: str | torch.device = "cpu"

    def __call__(self, n: int, generator: torch.Generator) -> tuple[dict, dict | None]:
        labels = torch.randint(0, self.num_classes, (n,), generator=generator).to(self.device)  # [n]
        return {"class_labels": labels}, self.null(n)

    def null(self, n: int) -> dict | None:
        if self.null_class is None:
            return None
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=self.device)}

    def labelled(self, labels: Tensor) -> tuple[dict, dict | None]:
        """Cond for chosen labels (sampling a given digit)."""
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise StepdistillError(f"class label {int(bad[0])} out of range [0, {self.num_classes})")
        return {"class_labels": labels.long().to(self.device)}, self.null(len(labels))


@dataclass
class Prompts:
    """Prompts drawn uniformly from a list; ``encode(list[str]) -> cond dict`` (embeddings cached).

    The null condition is ``encode_null()`` (one row, e.g. the pipeline's own negative branch:
    SDXL's zeros) when given, else the encoding of ``null_prompt``.
    """

    prompts: Sequence[str]
    encode: Callable[[list[str]], dict]
    null_prompt: str = ""
    encode_null: Callable[[], dict] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.prompts:
            raise StepdistillError("the prompt list is empty; give at least one prompt (one per line)")

    def _embed(self, texts: list[str]) -> dict:
        missing = [p for p in dict.fromkeys(texts) if p not in self._cache]
        if missing:
            encoded = self.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i] for k, v in encoded.items()}
        return {k: torch.stack([self._cache[p][k] for p in texts]) for k in self._cache[texts[0]]}

    def __call__(self, n: int, generator: torch.Generator) -> tuple[dict, dict]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).tolist()
        return self.texts([self.prompts[i] for i in idx])

    def texts(self, texts: list[str]) -> tuple[dict, dict]:
        return self._embed(texts), self.null(len(texts))

    def null(self, n: int) -> dict:
        if self.encode_null is None:
            return self._embed([self.null_prompt] * n)
        if "\0null" not in self._cache:
            self._cache["\0null"] = {k: v[0] for k, v in self.encode_null().items()}
        return {k: v.expand(n, *v.shape).clone() for k, v in self._cache["\0null"].items()}


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise StepdistillError(f"cannot read prompt file {path!r}: {e.strerror}") from None
    if not prompts:
        raise StepdistillError(f"prompt file {path!r} has no prompts (expected one per line)")
    return prompts


def concat_cond(a: Cond, b: Cond) -> dict:
    """Stack two conds along the batch (for one CFG forward pass)."""
    out = {}
    for key, value in a.items():
        if isinstance(value, Tensor):
            out[key] = torch.cat([value, b[key]])
        elif isinstance(value, dict):
            out[key] = concat_cond(value, b[key])
        else:
            out[key] = value
    return out


def guided(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, null_cond: Cond | None, scale: float) -> Tensor:
    """Classifier-free guidance in x0 space (Ho-Salimans convention: scale 1 = off, 0 = unconditional).

    x0 = x0(x_t, null) + scale * (x0(x_t, cond) - x0(x_t, null)); for a fixed t this equals
    CFG in epsilon space, since the eps <-> x0 map is affine.
    """
    if scale == 1.0 or null_cond is None:
        if scale != 1.0:
            raise StepdistillError(f"guidance scale {scale} needs a null condition, but this teacher has none")
        return denoiser(x_t, t, cond)
    if scale == 0.0:
        return denoiser(x_t, t, null_cond)
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(cond, null_cond))  # [2B, ...]
    x_c, x_u = both.chunk(2)
    return x_u + scale * (x_c - x_u)
