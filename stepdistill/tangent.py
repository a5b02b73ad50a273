"""Directional derivatives of a network (sCM's tangent): forward-mode AD or finite differences.

``directional_derivative(fn, primals, tangents)`` returns ``(fn(*primals), d/de fn(primals + e tangents))``:

* ``jvp``: ``torch.func.jvp`` inside ``jvp_safe``. Fused SDPA kernels (flash, memory-efficient,
  the CPU flash kernel) have no forward-AD formula (pytorch#128971, #117629), so the JVP runs
  under ``sdpa_kernel(SDPBackend.MATH)``; and forward AD through ``group_norm`` fails on a
  non-contiguous input (``UNet2DModel``: the attention output reshaped to NCHW feeds the next
  resnet's norm), so every ``nn.GroupNorm`` gets a pre-hook that makes its input contiguous.
* ``finite_diff``: the central difference (fn(p + h v) - fn(p - h v)) / (2 h), for backends that
  cannot run forward AD (xformers, flash kernels, FSDP). Error O(h^2) plus fp32 cancellation
  (reference ecosystem.md Sec. 9: relative error ~1e-4 at h = 1e-3 in fp32).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

TANGENT_METHODS = ("jvp", "finite_diff")


def _contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


@contextlib.contextmanager
def jvp_safe(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Math SDPA kernel and contiguous GroupNorm inputs while the block runs (hooks removed after)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    norms = {id(m): m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)}
    handles = [m.register_forward_pre_hook(_contiguous_input) for m in norms.values()]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for h in handles:
            h.remove()


def _per_sample(h: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar step as it is; a per-sample step [B] shaped to broadcast over ``like`` [B, ...] (its dtype)."""
    return h.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype) if isinstance(h, Tensor) else h


def finite_difference(fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor],
                      h: float | Tensor = 1e-3) -> tuple[Tensor, Tensor]:
    """(fn(p), central difference of fn along the tangents with step h: a float, or one step per sample [B])."""
    plus = fn(*[p + _per_sample(h, v) * v for p, v in zip(primals, tangents)])
    minus = fn(*[p - _per_sample(h, v) * v for p, v in zip(primals, tangents)])
    return fn(*primals), (plus.float() - minus.float()) / (2 * _per_sample(h, plus.float()))


def directional_derivative(fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor], method: str = "jvp",
                           modules: Sequence[nn.Module] = (), h: float | Tensor = 1e-3) -> tuple[Tensor, Tensor]:
    """(fn(primals), J tangents) by ``jvp`` (forward AD, made safe for ``modules``) or ``finite_diff``."""
    if method == "finite_diff":
        return finite_difference(fn, primals, tangents, h)
    with jvp_safe(modules):
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))


__all__ = ["directional_derivative", "finite_difference", "jvp_safe", "TANGENT_METHODS"]
