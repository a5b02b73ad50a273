"""SDXL: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` in ``StableDiffusionXLPipeline``.

Conditions: both CLIP encoders through ``StableDiffusionXLPipeline.encode_prompt`` (penultimate
hidden states concatenated, pooled ``text_embeds`` of ``text_encoder_2``; the null condition is
zeros when ``force_zeros_for_empty_prompt``), and ``time_ids`` = (original size, crop, target size)
from the training resolution. cond keys: ``prompt_embeds`` [B, 77, D], ``pooled_prompt_embeds``
[B, P], ``time_ids`` [B, 6].
"""

from __future__ import annotations

import torch

from . import Family, config_of, need, register_family


@register_family
class SDXL(Family):
    name = "sdxl"
    network_classes = ("UNet2DConditionModel",)
    pipeline_classes = ("StableDiffusionXLPipeline",)
    subfolder = "unet"
    text = True

    def claims(self, model_or_config) -> bool:
        config = config_of(model_or_config)
        return super().claims(model_or_config) and config.get("addition_embed_type") == "text_time"

    def call(self, model, x, timestep, cond):
        added = {"text_embeds": need(cond, "pooled_prompt_embeds", self.name), "time_ids": need(cond, "time_ids", self.name)}
        return model(x, timestep, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     timestep_cond=cond.get("timestep_cond"), added_cond_kwargs=added).sample

    def dummy_cond(self, config, batch):
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config.get("addition_time_embed_dim", 256)
        return {"prompt_embeds": torch.zeros(batch, 77, config["cross_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, pooled), "time_ids": torch.zeros(batch, 6)}
