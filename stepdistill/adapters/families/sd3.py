"""SD3 / SD3.5: ``SD3Transformer2DModel`` in ``StableDiffusion3Pipeline`` (rectified flow).

Conditions: CLIP-L + CLIP-G + T5 through ``StableDiffusion3Pipeline.encode_prompt``; cond keys
``prompt_embeds`` [B, 77 + T5 length, D] and ``pooled_prompt_embeds`` [B, P]. The network sees
sigma * 1000.
"""

from __future__ import annotations

import torch

from . import Family, need, register_family


@register_family
class SD3(Family):
    name = "sd3"
    network_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    subfolder = "transformer"
    text = True

    def call(self, model, x, timestep, cond):
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     pooled_projections=need(cond, "pooled_prompt_embeds", self.name)).sample

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 77, config["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, config["pooled_projection_dim"])}
