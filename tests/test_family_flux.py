"""FLUX family end to end on tiny random FluxPipelines (families.md 6, 11, 12).

Schnell-like (no guidance embedding, shift 1) and dev-like (``guidance_embeds``, shift 3 with
dynamic shifting, which export must switch off) teachers. Conditions equal the pipeline's own
``encode_prompt``; the family's packing equals ``FluxPipeline._pack_latents`` /
``_prepare_latent_image_ids``; one- and four-step students (shipped ``flux/dmd2``, shrunk)
export to stock folders whose latents, from a process without stepdistill, equal the toolkit's
student. The four-step stock pipeline draws its step noise from the global RNG in the packed
layout, so the toolkit side there re-noises with that same noise unpacked (same sampler,
other noise order than ``few_step_sample``'s own generator). LoRA loads with ``load_lora_weights``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from family_harness import TOL, clip_tokenizer, stock_latents, t5_tokenizer, train

PROMPTS = ["a red cube", "two cats on a sofa", "a city at night"]
FOUR = [1.0, 0.75, 0.5, 0.25]
STEP_SEED = 5
SMALL = ['data.real=""', "teacher.dtype=fp32", 'train.mixed_precision="no"', "train.gradient_checkpointing=false",
         "objective.critic_ratio=1", "student.lora_rank=2", "fake_score.lora_rank=2", "student.lora_alpha=2",
         "fake_score.lora_alpha=2", "student.lr=1e-2", "fake_score.lr=1e-3"]
FULL = ["student.init=copy", "fake_score.init=copy", "student.lr=1e-3"]


def _build(folder, dev: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8], guidance_embeds=dev)
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                          projection_dim=32)
    t5_tok = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, vocab_size=len(t5_tok))).eval()
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True) if dev else FlowMatchEulerDiscreteScheduler(shift=1.0)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=CLIPTextModel(clip).eval(),
                 tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok).save_pretrained(folder, safe_serialization=True)
    meta = {"max_sequence_length": 16, "latent_shape": [1, 8, 8]} | ({"guidance": 2.5} if dev else {})
    (folder / "stepdistill_teacher.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"schnell": _build(root / "schnell", False), "dev": _build(root / "dev", True)}


def _stock_encode(folder, prompts):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        pe, ppe, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=16)
    return pe, ppe


@pytest.mark.parametrize("kind", ["schnell", "dev"])
def test_conditioner_and_packing_are_the_pipelines(flux_dirs, kind):
    from diffusers import FluxPipeline

    from stepdistill.adapters.families.flux import image_ids, pack, unpack
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(flux_dirs[kind]), prompts=PROMPTS)
    cond, null = teacher.conditioner.texts(PROMPTS[::-1])
    pe, ppe = _stock_encode(flux_dirs[kind], PROMPTS[::-1])
    assert torch.equal(cond["prompt_embeds"], pe) and torch.equal(cond["pooled_prompt_embeds"], ppe)
    assert pe.shape == (3, 16, 32) and teacher.sample_shape == (1, 8, 8)
    assert ("guidance" in cond) == (kind == "dev") and ("guidance" not in cond or torch.equal(cond["guidance"], torch.full((3,), 2.5)))
    npe, _ = _stock_encode(flux_dirs[kind], [""])  # no negative branch: the null is encode_prompt("")
    assert torch.equal(null["prompt_embeds"], npe.expand(3, -1, -1))
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 3, 6, 4))
    assert torch.equal(unpack(pack(x), 6, 4), x) and torch.equal(unpack(pack(x), 6, 4), FluxPipeline._unpack_latents(pack(x), 6, 4, 1))
    assert torch.equal(image_ids(6, 4, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))


def _toolkit(run, cond, step_seed):
    """The student's few-step sampler, re-noising with the stock pipeline's packed global-RNG noise (unpacked)."""
    from stepdistill.adapters.families.flux import unpack
    from stepdistill.contract import add_noise, as_time
    from stepdistill.training.run import load_student

    student = load_student(run)
    shape = (len(cond["prompt_embeds"]), *student.teacher.sample_shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(step_seed)
    times = student.times
    with torch.no_grad():
        for k, t in enumerate(times):
            x0 = student.view(x, as_time(t, x), cond)
            if k < len(times) - 1:
                z = unpack(torch.randn(shape[0], shape[2] * shape[3] // 4, shape[1] * 4, generator=g), *shape[2:])
                x = add_noise(student.view.schedule, x0, z, as_time(times[k + 1], x))
    return x0, student


def _call(meta, n, prompts):
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["call_kwargs"][str(n)].items())
    return f"prompt={prompts!r}, {kwargs}, **(torch.manual_seed({STEP_SEED}) and {{}})"  # step noise: global RNG


def _unpacked(x):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, 8, 8, 1)  # output_type="latent" is packed


@pytest.mark.parametrize("kind,times", [("schnell", [1.0]), ("dev", FOUR)])
def test_export_replays_the_student_in_a_stock_process(tmp_path, flux_dirs, kind, times):
    from stepdistill.export import export_run

    run = train(tmp_path, flux_dirs[kind], "flux/dmd2", times, PROMPTS, *SMALL, *FULL)
    out = tmp_path / "export"
    meta = export_run(run, out)
    kwargs = meta["call_kwargs"][str(len(times))]
    # FluxPipeline's default sigmas linspace(1, 1/N, N) are the student's: no sigmas= needed
    assert kwargs == {"num_inference_steps": len(times), "height": 8, "width": 8, "max_sequence_length": 16} | (
        {"guidance_scale": 2.5} if kind == "dev" else {})
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == 1.0 and not sched["use_dynamic_shifting"] and sched["stochastic_sampling"] == (len(times) > 1)
    prompts = PROMPTS[:2]
    stock = _unpacked(stock_latents(out, "FluxPipeline", _call(meta, len(times), prompts), tmp_path / "stock.safetensors"))
    pe, ppe = _stock_encode(out, prompts)
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe} | ({"guidance": torch.full((2,), 2.5)} if kind == "dev" else {})
    ours, student = _toolkit(run, cond, STEP_SEED)
    assert stock.shape == ours.shape == (2, 1, 8, 8)
    assert (stock - ours).abs().max() <= TOL
    if len(times) == 1:  # the folder holds the student, not the teacher
        with torch.no_grad():
            teacher = student.teacher.denoiser(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.ones(2), cond)
        assert (teacher - ours).abs().max() > 1e-2
    assert "num_inference_steps" in (out / "README.md").read_text()


def test_lora_export_loads_with_load_lora_weights(tmp_path, flux_dirs):
    from stepdistill.export import export_run

    run = train(tmp_path, flux_dirs["schnell"], "flux/dmd2", [1.0], PROMPTS, *SMALL, "student.lr=0.3")  # big LoRA steps: a visible adapter
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    call = _call(meta, 1, PROMPTS[:2])
    merged = stock_latents(out, "FluxPipeline", call, tmp_path / "merged.safetensors")
    base = tmp_path / "teacher-base"
    shutil.copytree(flux_dirs["schnell"], base)
    adapter = stock_latents(out, "FluxPipeline", call, tmp_path / "lora.safetensors", load_lora=out / "lora", base=base)
    assert (merged - adapter).abs().max() <= TOL
    pe, ppe = _stock_encode(out, PROMPTS[:2])
    with torch.no_grad():
        teacher = _fresh_teacher(flux_dirs["schnell"])(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                                     torch.ones(2), {"prompt_embeds": pe, "pooled_prompt_embeds": ppe})
    assert (teacher - _unpacked(adapter)).abs().max() > 1e-3


def _fresh_teacher(folder):
    """The teacher network alone (a LoRA run's teacher view shares its base with the student's adapter)."""
    from diffusers import FluxTransformer2DModel

    from stepdistill.adapters import wrap

    model = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    return wrap(model, json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
