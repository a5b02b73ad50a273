"""``stepdistill plan`` at full size (meta device, nothing allocated) for every text-to-image family:
the network is built from a published-shape config, the conditions come from the family record,
and per-network memory is printed. Parameter counts pin the layouts."""

from __future__ import annotations

import pytest
import torch

from stepdistill.cli import main

FULL = {  # family -> (diffusers class, published-shape config, scheduler, parameters in millions as printed)
    "sdxl": ("UNet2DConditionModel", dict(
        block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128), "DDPMScheduler"),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192), "FlowMatchEulerDiscreteScheduler"),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56]), "FlowMatchEulerDiscreteScheduler"),
    "sana": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
        cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1),
        "FlowMatchEulerDiscreteScheduler"),
    "pixart": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
        caption_channels=4096, cross_attention_dim=1152, patch_size=2, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False), "DDPMScheduler"),
}


@pytest.mark.parametrize("family", list(FULL))
def test_plan_at_full_size_prints_per_network_memory(tmp_path, capsys, family):
    import diffusers

    cls_name, config, sched, = FULL[family]
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**config)
    sub = "unet" if cls_name.startswith("UNet") else "transformer"
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "config.json").write_text(model.to_json_string())
    getattr(diffusers, sched)().save_pretrained(tmp_path / "scheduler")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert main(["plan", "digits-sd/dmd2", f"teacher.name={tmp_path}", "--batch-size", "1", "--precision", "bf16",
                 "student.init=lora", "fake_score.init=lora", "train.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    print(family, f"{params:.1f}M", out)
    for name in ("teacher", "student", "fake_score"):
        assert any(line.startswith(name) and "GiB" in line for line in out.splitlines()), (name, out)
    assert f"{params:.1f}M" in out, (params, out)
