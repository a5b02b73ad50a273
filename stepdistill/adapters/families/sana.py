"""SANA: ``SanaTransformer2DModel`` in ``SanaPipeline`` (flow), Gemma-2 text encoder, ``AutoencoderDC``.

Conditions: ``SanaPipeline.encode_prompt`` (right padding, the attention mask, BOS + the last
positions); cond keys ``prompt_embeds`` [B, L, D], ``prompt_attention_mask`` [B, L] and, for
SANA-Sprint networks (``guidance_embeds``), ``guidance`` [B]. The network sees
sigma * 1000 * ``timestep_scale``.
"""

from __future__ import annotations

import torch

from . import Family, need, register_family


@register_family
class Sana(Family):
    name = "sana"
    network_classes = ("SanaTransformer2DModel",)
    pipeline_classes = ("SanaPipeline", "SanaSprintPipeline")
    subfolder = "transformer"
    text = True

    def call(self, model, x, timestep, cond):
        return model(x, encoder_hidden_states=need(cond, "prompt_embeds", self.name), timestep=timestep,
                     guidance=cond.get("guidance"), encoder_attention_mask=cond.get("prompt_attention_mask")).sample

    def native_timestep(self, schedule, t):
        return schedule.to_native(t)

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 300, config["caption_channels"]),
                "prompt_attention_mask": torch.ones(batch, 300, dtype=torch.long)}
