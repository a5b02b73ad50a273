"""PixArt-Sigma: ``PixArtTransformer2DModel`` in ``PixArtSigmaPipeline`` (VP, epsilon + learned sigma), T5.

Conditions: ``PixArtSigmaPipeline.encode_prompt`` (T5 with its attention mask); cond keys
``prompt_embeds`` [B, L, D] and ``prompt_attention_mask`` [B, L]. The learned-variance half of
the output is dropped by the adapter. No diffusers LoRA loader: LoRA students export merged.
"""

from __future__ import annotations

import torch

from . import Family, need, register_family


@register_family
class PixArt(Family):
    name = "pixart"
    network_classes = ("PixArtTransformer2DModel",)
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    subfolder = "transformer"
    text = True
    lora_loader = False

    def call(self, model, x, timestep, cond):
        return model(x, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     encoder_attention_mask=cond.get("prompt_attention_mask"), timestep=timestep,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 300, config["caption_channels"]),
                "prompt_attention_mask": torch.ones(batch, 300, dtype=torch.long)}
