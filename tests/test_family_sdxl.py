"""SDXL end to end on a tiny random StableDiffusionXLPipeline built here (families.md section 11).

The toolkit's conditions are the pipeline's own ``encode_prompt`` (and zeros for the null
condition); a 1- and a 4-step DMD2 student exported as a stock ``StableDiffusionXLPipeline``
folder replays the toolkit's sampler in a process that never imports stepdistill; a LoRA student
also round-trips through ``load_lora_weights`` on the teacher's pipeline.
"""

from __future__ import annotations

import json

import pytest
import torch

import family_harness as fh
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run

PROMPTS = ["a red cube on a table", "a photo of a cat"]
FOUR = [1.0, 0.75, 0.5, 0.25]  # snaps to [999, 749, 499, 249] = LCMScheduler's 4-step grid
LATENT, SCALE = 8, 2  # 8x8 latents, VAE with two levels: trained (and sampled) at 16x16 px
# CPU-sized: fp32 (the recipe's bf16 is for GPUs), one critic update per round, no real data
# ("data.real=": the harness passes "none", which load_real reads as an image folder)
CPU = ("data.real=", "teacher.dtype=fp32", "train.mixed_precision='no'", "train.gradient_checkpointing=false")
FAST = ("objective.critic_ratio=1", *CPU)


def tiny_sdxl_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=1, sample_size=LATENT, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        sample_size=LATENT * SCALE)
    text = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                          projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(text).eval(),
                                     tokenizer=fh.clip_tokenizer(), tokenizer_2=fh.clip_tokenizer(pad="!"), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def _stock_pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_cond(pipe, prompts) -> dict:
    """The stock pipeline's own prompt encoding and time_ids at the training resolution."""
    h = w = LATENT * SCALE
    pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}


def _call(n_steps, prompts, guidance=None):
    g = "" if guidance is None else f", guidance_scale={guidance}"
    return f"prompt={prompts!r}, num_inference_steps={n_steps}, height={LATENT * SCALE}, width={LATENT * SCALE}{g}"


def test_conditions_are_the_pipelines_own_encoding(sdxl_dir):
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(sdxl_dir), prompts=PROMPTS)
    assert teacher.denoiser.record.name == "sdxl" and teacher.sample_shape == (4, LATENT, LATENT)
    cond, null = teacher.conditioner.texts(PROMPTS)
    want = _pipeline_cond(_stock_pipe(sdxl_dir), PROMPTS)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "time_ids"}
    assert cond["prompt_embeds"].shape == (2, 77, 64) and cond["pooled_prompt_embeds"].shape == (2, 32)
    for key in want:
        assert torch.equal(cond[key], want[key]), key
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    assert not null["prompt_embeds"].any() and not null["pooled_prompt_embeds"].any()  # force_zeros_for_empty_prompt
    assert torch.equal(null["time_ids"], want["time_ids"])
    assert cond["prompt_embeds"].abs().sum() > 0


def test_prompts_are_required(sdxl_dir):
    from stepdistill.teachers import load_teacher

    with pytest.raises(StepdistillError, match="data.conditions=prompts:"):
        load_teacher(str(sdxl_dir))


def test_empty_prompt_is_encoded_without_force_zeros(tmp_path, sdxl_dir):
    import shutil

    from stepdistill.teachers import load_teacher

    folder = tmp_path / "nozeros"
    shutil.copytree(sdxl_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    null = load_teacher(str(folder), prompts=PROMPTS).conditioner.null(1)
    pipe = _stock_pipe(folder)
    _, npe, _, npooled = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert null["prompt_embeds"].abs().sum() > 0 and torch.equal(null["prompt_embeds"], npe)
    assert torch.equal(null["pooled_prompt_embeds"], npooled)


@pytest.mark.parametrize("times", [[1.0], FOUR])
def test_stock_pipeline_replays_the_student(tmp_path, sdxl_dir, times):
    run = fh.train(tmp_path, sdxl_dir, "sdxl/dmd2", times, PROMPTS, *FAST, "student.lr=1e-3", "fake_score.lr=1e-3")
    out = tmp_path / "export"
    meta = export_run(run, out)
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and meta["scheduler"] == "LCMScheduler"
    assert json.loads((out / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    card = (out / "README.md").read_text()
    assert "trust_remote_code" not in card and f"num_inference_steps={len(times)}, height=16, width=16," in card
    stock = fh.stock_latents(out, "StableDiffusionXLPipeline", _call(len(times), PROMPTS), tmp_path / "stock.safetensors")
    ours = fh.toolkit_latents(run, _pipeline_cond(_stock_pipe(out), PROMPTS), seed=0)
    assert stock.shape == ours.shape == (2, 4, LATENT, LATENT)
    assert (stock - ours).abs().max() <= fh.TOL
    # CFG cannot switch on by accident: the zero guidance projection turns it off at any guidance_scale
    pipe = _stock_pipe(out)
    kwargs = dict(num_inference_steps=len(times), height=LATENT * SCALE, width=LATENT * SCALE, output_type="latent")
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    guided = pipe(PROMPTS, guidance_scale=7.5, negative_prompt=["a dog", ""], generator=torch.Generator().manual_seed(0),
                  **kwargs).images
    assert (plain - stock).abs().max() <= fh.TOL and (guided - plain).abs().max() <= fh.TOL
    print(f"sdxl {len(times)}-step: stock vs toolkit max abs {(stock - ours).abs().max():.2e}")


def test_lora_student_round_trips_through_load_lora_weights(tmp_path, sdxl_dir):
    run = fh.train(tmp_path, sdxl_dir, "sdxl/dmd2", [1.0], PROMPTS, *FAST, "student.init=lora", "fake_score.init=lora",
                   "student.lora_rank=2", "fake_score.lora_rank=2", "student.lr=1e-2", "fake_score.lr=1e-3")
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    assert meta["lora_file"].endswith("lora/pytorch_lora_weights.safetensors")
    ours = fh.toolkit_latents(run, _pipeline_cond(_stock_pipe(out), PROMPTS), seed=0)
    merged = fh.stock_latents(out, "StableDiffusionXLPipeline", _call(1, PROMPTS), tmp_path / "merged.safetensors")
    assert (merged - ours).abs().max() <= fh.TOL
    # the teacher folder + load_lora_weights + LCMScheduler, CFG off by guidance_scale=1 (the adapter has no guidance projection)
    from diffusers import LCMScheduler

    teacher = _stock_pipe(sdxl_dir)
    teacher.scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=1000, clip_sample=False)
    kwargs = dict(num_inference_steps=1, height=LATENT * SCALE, width=LATENT * SCALE, guidance_scale=1.0, output_type="latent")
    base = teacher(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    teacher.load_lora_weights(out / "lora")
    lora = teacher(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (lora - ours).abs().max() <= fh.TOL
    print(f"sdxl lora: merged {(merged - ours).abs().max():.2e}, load_lora_weights {(lora - ours).abs().max():.2e}, "
          f"teacher without adapter {(base - ours).abs().max():.2e}")
    assert (base - ours).abs().max() > 1e-3, "the adapter must change the teacher's output"


def test_export_refuses_times_off_the_lcm_grid(tmp_path, sdxl_dir):
    run = fh.train(tmp_path, sdxl_dir, "sdxl/dmd2", [0.4], PROMPTS, *FAST)  # DMD2's one-step t=399
    with pytest.raises(StepdistillError, match="LCMScheduler's grid"):
        export_run(run, tmp_path / "o")


def test_plan_dummy_cond_runs_the_network(sdxl_dir):
    from stepdistill.adapters.families import family_for_folder
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir / "unet")
    record = family_for_folder(sdxl_dir, dict(unet.config))
    assert record.name == "sdxl"
    cond = record.dummy_cond(dict(unet.config), 2)
    out = record.call(unet, torch.randn(2, 4, LATENT, LATENT), torch.tensor([999, 999]), cond)
    assert out.shape == (2, 4, LATENT, LATENT)


def test_lcm_lora_recipe_exports_other_step_counts(tmp_path, sdxl_dir):
    """sdxl/lcm (LCM-LoRA) trains; its consistency student exports at 2 steps and the stock folder replays it."""
    from stepdistill.sampling import few_step_sample
    from stepdistill.training.run import load_student

    run = fh.train(tmp_path, sdxl_dir, "sdxl/lcm", [1.0], PROMPTS, *CPU, "objective.synthetic_pool=2",
                   "objective.synthetic_steps=2", "student.lora_rank=2", "student.lr=1e-2")
    out = tmp_path / "export"
    meta = export_run(run, out, steps=[2], lora=True)
    assert meta["steps"] == [2] and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = _stock_pipe(out)
    stock = pipe(PROMPTS, num_inference_steps=2, height=16, width=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    student = load_student(run)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(PROMPTS), *student.teacher.sample_shape, generator=g)
    with torch.no_grad():
        ours = few_step_sample(student.view, noise, _pipeline_cond(pipe, PROMPTS), meta["student_times"]["2"], g)
    assert (stock - ours).abs().max() <= fh.TOL
