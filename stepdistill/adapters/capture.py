"""Intermediate features of a denoiser, for discriminator heads (DMD2's GAN head, LADD).

``capture`` records the outputs of named submodules during one forward call with forward
hooks, so any diffusers UNet or transformer (or the toy MLP) can feed a discriminator without
changes to the model. ``default_feature_layers`` picks sensible layers per architecture:

| model                                   | default layers                                  |
|-----------------------------------------|-------------------------------------------------|
| UNet2DModel / UNet2DConditionModel      | ``mid_block`` (the bottleneck, as DMD2)          |
| DiT / SD3 / Sana / PixArt transformers  | the middle and last transformer block (LADD-like)|
| MLPDenoiser                             | ``body`` (the last hidden layer)                 |

Features are returned as [B, C, H, W] (UNet), [B, N, D] (transformer tokens) or [B, D] (MLP);
``pool_features`` reduces any of them to [B, D].
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..contract import StepdistillError
from ..training.networks import inner_model




def default_feature_layers(module: nn.Module) -> list[str]:
    """Names (relative to the inner network) of the layers a discriminator reads by default."""
    net = inner_model(module)
    names = dict(net.named_modules())
    if "mid_block" in names and names["mid_block"] is not None:
        return ["mid_block"]
    blocks = next((k for k in ("transformer_blocks", "blocks") if isinstance(names.get(k), nn.ModuleList)), None)
    if blocks:
        n = len(names[blocks])
        return sorted({f"{blocks}.{n // 2}", f"{blocks}.{n - 1}"}, key=lambda s: int(s.rsplit(".", 1)[1]))
    if "body" in names:
        return ["body"]
    raise StepdistillError(f"no default feature layers for {type(net).__name__}; set the objective's feature_layers")


_JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock")  # SD3 / FLUX: the text stream comes first (None in SD3's last block)


@contextlib.contextmanager
def capture(module: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward of ``module`` stores ``{layer: output}`` (last call wins)."""
    net = inner_model(module)
    names = dict(net.named_modules())
    missing = [n for n in layers if n not in names]
    if missing:
        raise StepdistillError(f"feature layers {missing} not found in {type(net).__name__}")
    store: dict[str, Tensor] = {}

    def hook(name):
        def fn(mod, _inp, out):
            if isinstance(out, (tuple, list)):  # joint blocks: (encoder_hidden_states, hidden_states), image tokens last
                out = out[-1] if type(mod).__name__ in _JOINT_BLOCKS else out[0]
            store[name] = getattr(out, "sample", out)
        return fn

    handles = [names[n].register_forward_hook(hook(n)) for n in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def pool_features(f: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C] (spatial mean); [B, N, D] -> [B, D] (token mean); [B, D] as is."""
    if f.ndim == 4:
        return f.float().mean((2, 3))
    if f.ndim == 3:
        return f.float().mean(1)
    return f.float().reshape(len(f), -1)


def feature_dims(module: nn.Module, layers: Sequence[str], call) -> dict[str, tuple[int, ...]]:
    """Shapes (without batch) of each layer's output for one dry forward ``call()`` (no grad)."""
    with torch.no_grad(), capture(module, layers) as feats:
        call()
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


__all__ = ["capture", "default_feature_layers", "feature_dims", "pool_features"]
