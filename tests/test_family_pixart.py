"""PixArt-Sigma end to end on a tiny random PixArtSigmaPipeline (families.md 9, 11, 12).

The conditioner's embeddings are ``PixArtSigmaPipeline.encode_prompt``'s; 1- and 4-step students
(times [1.0] and [1.0, .75, .5, .25], snapped to [999] and [999, 749, 499, 249]), two rounds each,
export as a stock folder with ``LCMScheduler``, which a fresh process runs with
``num_inference_steps=N`` to the toolkit's own latents; a LoRA student exports merged, --lora is
refused (no diffusers loader).
"""

from __future__ import annotations

import json

import pytest
import torch

import family_harness as fh
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run
from stepdistill.teachers import load_teacher

PROMPTS = ["a red circle", "Two Blue Squares", "a cat"]
RUN = ("objective.critic_ratio=1", "student.lr=1e-3", "fake_score.lr=1e-3")
SIZE = 8


def build_pixart(folder):
    """A tiny PixArtSigmaPipeline folder; the teacher scheduler is DPM-Solver defaults (linear betas), as converted."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = fh.t5_tokenizer()
    t5 = T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, vocab_size=len(tok))).eval()
    transformer = PixArtTransformer2DModel(sample_size=SIZE, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                           out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                           num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6, use_additional_conditions=False).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)  # f = 1
    PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return build_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart")


def _stock_encode(folder, prompts):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    with torch.no_grad():  # as __call__ runs it
        return pipe.encode_prompt(prompts, True, negative_prompt="", device="cpu", clean_caption=False, max_sequence_length=300)


def test_conditioner_is_the_pipelines_encode_prompt(pixart_dir):
    teacher = load_teacher(str(pixart_dir), prompts=PROMPTS)
    assert teacher.denoiser.record.name == "pixart" and teacher.denoiser.schedule.kind == "vp"
    assert teacher.denoiser.prediction_type == "epsilon" and teacher.sample_shape == (4, SIZE, SIZE)
    cond, null = teacher.conditioner.texts(PROMPTS)
    pe, pm, npe, npm = _stock_encode(pixart_dir, PROMPTS)
    assert cond["prompt_embeds"].shape == (3, 300, 32) and torch.equal(cond["prompt_embeds"], pe)
    assert torch.equal(cond["prompt_attention_mask"], pm)
    assert torch.equal(null["prompt_embeds"], npe) and torch.equal(null["prompt_attention_mask"], npm)
    x = torch.randn(3, 4, SIZE, SIZE)
    assert teacher.denoiser(x, torch.full((3,), 0.5), cond).shape == x.shape  # learned-sigma channels dropped


def _call(n, prompts=PROMPTS):
    return (f"prompt={prompts!r}, num_inference_steps={n}, guidance_scale=1.0, use_resolution_binning=False, "
            "clean_caption=False, max_sequence_length=300")


def _toolkit(run, out):
    pe, pm, _, _ = _stock_encode(out, PROMPTS)  # the exported pipeline's own encoding
    return fh.toolkit_latents(run, {"prompt_embeds": pe, "prompt_attention_mask": pm}, seed=0)


@pytest.mark.parametrize("recipe, times", [("pixart/dmd2", [1.0]), ("digits-sd/dmd2", [1.0, 0.75, 0.5, 0.25])])
def test_export_replays_the_student(tmp_path, pixart_dir, recipe, times):
    """The shipped PixArt recipe (settings shrunk for CPU) at one step; the digits-sd one at four."""
    small = ("teacher.dtype=fp32", 'train.mixed_precision="no"', "train.gradient_checkpointing=false")
    run = fh.train(tmp_path, pixart_dir, recipe, times, PROMPTS, *RUN, *small)
    out = tmp_path / "export"
    meta = export_run(run, out)
    assert meta["pipeline"] == "PixArtSigmaPipeline" and meta["call_kwargs"][str(len(times))]["num_inference_steps"] == len(times)
    assert f"num_inference_steps={len(times)}, guidance_scale=1.0" in (out / "README.md").read_text()
    assert json.loads((out / "transformer" / "config.json").read_text())["use_additional_conditions"] is False
    stock = fh.stock_latents(out, "PixArtSigmaPipeline", _call(len(times)), tmp_path / "stock.safetensors")
    ours = _toolkit(run, out)
    assert stock.shape == ours.shape == (3, 4, SIZE, SIZE)
    assert (stock - ours).abs().max() <= fh.TOL
    assert (ours - fh.toolkit_latents(run, {"prompt_embeds": torch.zeros(3, 300, 32)}, 0)).abs().max() > 1e-4  # prompts matter


def test_lora_student_exports_merged(tmp_path, pixart_dir):
    run = fh.train(tmp_path, pixart_dir, "digits-sd/dmd2", [1.0], PROMPTS, *RUN, "student.init=lora", "student.lora_rank=4",
                   "student.lr=1e-2")
    with pytest.raises(StepdistillError, match="no LoRA loader"):
        export_run(run, tmp_path / "lora-export", lora=True)
    out = tmp_path / "export"
    export_run(run, out)
    stock = fh.stock_latents(out, "PixArtSigmaPipeline", _call(1), tmp_path / "stock.safetensors")
    ours = _toolkit(run, out)
    assert (stock - ours).abs().max() <= fh.TOL
    from safetensors.torch import load_file

    a, b = (load_file(str(f / "transformer" / "diffusion_pytorch_model.safetensors")) for f in (pixart_dir, out))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) > 0  # merged, not an adapter


def test_off_grid_student_is_refused(tmp_path, pixart_dir):
    """[999, 299]: no original_inference_steps gives it ([999, 599] is LCMScheduler(original_inference_steps=5)'s grid)."""
    run = fh.train(tmp_path, pixart_dir, "digits-sd/dmd2", [1.0, 0.3], PROMPTS, *RUN)
    with pytest.raises(StepdistillError, match=r"student.times=\[1.0, 0.499499\]"):
        export_run(run, tmp_path / "export")
