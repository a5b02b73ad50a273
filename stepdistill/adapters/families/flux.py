"""FLUX.1: ``FluxTransformer2DModel`` in ``FluxPipeline`` (flow), CLIP (pooled) + T5, packed latents.

The toolkit's samples stay unpacked latents [B, C, H, W]; the call packs them into 2x2 patches
[B, HW/4, 4C] with their image ids, and unpacks the output. The network takes sigma (it
multiplies by 1000 itself) and, for guidance-distilled (dev) networks, ``guidance`` [B].
cond keys: ``prompt_embeds`` [B, L, D], ``pooled_prompt_embeds`` [B, P], optional ``guidance``.
"""

from __future__ import annotations

import torch

from . import Family, need, register_family


def pack(x):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h: int, w: int):
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] (FluxPipeline._unpack_latents)."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype):
    """[(H/2)(W/2), 3] = [0, row, col] (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


@register_family
class Flux(Family):
    name = "flux"
    network_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    subfolder = "transformer"
    text = True
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def call(self, model, x, timestep, cond):
        h, w = x.shape[-2:]
        pe = need(cond, "prompt_embeds", self.name)
        guidance = cond.get("guidance")
        if model.config.get("guidance_embeds") and guidance is None:
            guidance = torch.full((len(x),), 3.5, device=x.device)
        out = model(hidden_states=pack(x), timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                    pooled_projections=need(cond, "pooled_prompt_embeds", self.name), encoder_hidden_states=pe,
                    txt_ids=torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype),
                    img_ids=image_ids(h, w, x.device, x.dtype)).sample
        return unpack(out, h, w)

    def sample_shape(self, config, codec):
        size = config.get("sample_size") or 16  # FLUX configs carry no sample size; 16 latent px unless the recipe says
        return (int(config["in_channels"]) // 4, int(size), int(size))

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 512, config["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, config["pooled_projection_dim"])}
