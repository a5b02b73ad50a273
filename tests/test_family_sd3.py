"""SD3 family end to end on a tiny random StableDiffusion3Pipeline (families.md 5, 11, 12).

Conditions equal the pipeline's own ``encode_prompt``; one- and four-step students (the shipped
``sd3/dmd2`` recipe, shrunk) export to a stock folder that a process without stepdistill loads
as ``StableDiffusion3Pipeline`` and that gives the toolkit's latents (same initial noise from
``generator``; the four-step re-noising from the global RNG, which SD3 uses for
``scheduler.step``); a LoRA export loads with ``load_lora_weights`` and equals the merged one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from family_harness import TOL, clip_tokenizer, export_meta, stock_latents, t5_tokenizer, train
from stepdistill.contract import StepdistillError

PROMPTS = ["a red cube", "two cats on a sofa", "a city at night"]
FOUR = [1.0, 0.75, 0.5, 0.25]
STEP_SEED = 11  # torch.manual_seed for the stock pipeline's step noise
SMALL = ['data.real=""', "teacher.dtype=fp32", 'train.mixed_precision="no"', "train.gradient_checkpointing=false", "objective.critic_ratio=1",
         "student.lora_rank=2", "fake_score.lora_rank=2", "student.lora_alpha=2", "fake_score.lora_alpha=2",
         "student.lr=1e-2", "fake_score.lr=1e-3", "objective.guidance_scale=3"]
FULL = ["student.init=copy", "fake_score.init=copy", "student.lr=1e-3"]  # full-copy students: every weight moves


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64)
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                          projection_dim=32)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, vocab_size=len(t5_tok))).eval()
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=clip_tokenizer(pad="!"),
        text_encoder_3=t5, tokenizer_3=t5_tok)
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"max_sequence_length": 16}))
    return folder


def _stock_encode(folder, prompts):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True,
                                                max_sequence_length=16)
    return pe, npe, ppe, nppe


def test_conditioner_is_the_pipelines_encode_prompt(sd3_dir):
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(sd3_dir), prompts=PROMPTS)
    cond, null = teacher.conditioner.texts(PROMPTS[::-1])
    pe, npe, ppe, nppe = _stock_encode(sd3_dir, PROMPTS[::-1])
    assert cond["prompt_embeds"].shape == (3, 77 + 16, 32) and cond["pooled_prompt_embeds"].shape == (3, 64)
    assert torch.equal(cond["prompt_embeds"], pe) and torch.equal(cond["pooled_prompt_embeds"], ppe)
    _, npe, _, nppe = _stock_encode(sd3_dir, PROMPTS[:1])  # the negative branch of "" (one row, batched as the pipeline)
    assert torch.equal(null["prompt_embeds"], npe.expand(3, -1, -1)) and torch.equal(null["pooled_prompt_embeds"], nppe.expand(3, -1))
    assert teacher.sample_shape == (4, 8, 8) and teacher.codec.shift == pytest.approx(0.0609)


def _toolkit(run, cond, step_seed):
    from stepdistill.sampling import few_step_sample
    from stepdistill.training.run import load_student

    student = load_student(run)
    noise = torch.randn(len(cond["prompt_embeds"]), *student.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return few_step_sample(student.view, noise, cond, student.times, torch.Generator().manual_seed(step_seed)), student


def _call(meta, n, prompts):
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["call_kwargs"][str(n)].items())
    # SD3 draws scheduler.step's fresh noise from the global RNG: seed it right before the call
    return f"prompt={prompts!r}, {kwargs}, **(torch.manual_seed({STEP_SEED}) and {{}})"


@pytest.mark.parametrize("times", [[1.0], FOUR])
def test_export_replays_the_student_in_a_stock_process(tmp_path, sd3_dir, times):
    from stepdistill.export import export_run

    run = train(tmp_path, sd3_dir, "sd3/dmd2", times, PROMPTS, *SMALL, *FULL)
    out = tmp_path / "export"
    meta = export_run(run, out)
    kwargs = meta["call_kwargs"][str(len(times))]
    assert meta["pipeline"] == "StableDiffusion3Pipeline" and kwargs["guidance_scale"] == 1.0
    assert kwargs["max_sequence_length"] == 16 and (kwargs["height"], kwargs["width"]) == (8, 8)
    # shift 1: the default 1-step schedule is [1.0]; four steps need the student's sigmas (linspace(1, 1/1000, 4) otherwise)
    assert kwargs.get("sigmas") == (None if len(times) == 1 else FOUR)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] == (len(times) > 1)
    prompts = PROMPTS[:2]
    stock = stock_latents(out, "StableDiffusion3Pipeline", _call(meta, len(times), prompts), tmp_path / "stock.safetensors")
    pe, _, ppe, _ = _stock_encode(out, prompts)
    ours, student = _toolkit(run, {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}, STEP_SEED)
    assert stock.shape == ours.shape == (2, 4, 8, 8)
    assert (stock - ours).abs().max() <= TOL
    # the folder holds the student, not the teacher
    teacher_x0 = student.teacher.denoiser(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                                          torch.ones(2), {"prompt_embeds": pe, "pooled_prompt_embeds": ppe})
    assert len(times) > 1 or (teacher_x0 - ours).abs().max() > 1e-2
    card = (out / "README.md").read_text()
    assert "guidance_scale=1.0" in card and ("sigmas=" in card) == (len(times) > 1)
    assert export_meta(out)["call_kwargs"] == meta["call_kwargs"]


def test_lora_export_loads_with_load_lora_weights(tmp_path, sd3_dir):
    from stepdistill.export import export_run

    run = train(tmp_path, sd3_dir, "sd3/dmd2", [1.0], PROMPTS, *SMALL, "student.lr=0.3")  # big LoRA steps: a visible adapter
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    call = _call(meta, 1, PROMPTS[:2])
    merged = stock_latents(out, "StableDiffusion3Pipeline", call, tmp_path / "merged.safetensors")
    base = tmp_path / "teacher-base"  # the teacher with the export's scheduler, as the card says
    shutil.copytree(sd3_dir, base)
    shutil.rmtree(base / "scheduler")
    shutil.copytree(out / "scheduler", base / "scheduler")
    adapter = stock_latents(out, "StableDiffusion3Pipeline", call, tmp_path / "lora.safetensors", load_lora=out / "lora", base=base)
    assert (merged - adapter).abs().max() <= TOL
    pe, _, ppe, _ = _stock_encode(out, PROMPTS[:2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = _fresh_teacher(sd3_dir)(noise, torch.ones(2), {"prompt_embeds": pe, "pooled_prompt_embeds": ppe})
    assert (teacher - adapter).abs().max() > 1e-3  # the adapter changes the teacher


def test_times_the_stock_pipeline_cannot_run_are_refused():
    from stepdistill.adapters.families.sd3 import check_times

    check_times({4: FOUR}, "StableDiffusion3Pipeline")
    for bad in ([1.0, 1.0], [1.0, 0.0], [1.2]):
        with pytest.raises(StepdistillError, match="cannot be replayed"):
            check_times({len(bad): bad}, "StableDiffusion3Pipeline")


def _fresh_teacher(folder):
    """The teacher network alone (a LoRA run's teacher view shares its base with the student's adapter)."""
    from diffusers import SD3Transformer2DModel

    from stepdistill.adapters import wrap

    model = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    return wrap(model, json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
