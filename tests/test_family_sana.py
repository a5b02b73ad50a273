"""SANA end to end on a tiny random SanaPipeline (families.md 7, 11, 12).

The conditioner's embeddings are ``SanaPipeline.encode_prompt``'s (with ``__call__``'s default
complex human instruction); 1- and 4-step students, two rounds each, export as a stock
``SanaPipeline`` folder that a fresh process (no stepdistill) runs with ``sigmas=`` to the
toolkit's own latents; a LoRA student round-trips through ``SanaPipeline.load_lora_weights``.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import family_harness as fh
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run
from stepdistill.teachers import load_teacher

PROMPTS = ["a red circle", "Two Blue Squares", "a cat"]
FLOW = ("objective.critic_weighting=flow", "objective.critic_ratio=1", "data.real=")  # data.real=none is not a spec
SIZE = 16  # latent side; AutoencoderDC below has f = 2: the stock call asks for 32 x 32 pixels (SANA wants multiples of 32)


def _chi():
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    """A tiny SanaPipeline folder with the published DPM-Solver flow scheduler (flow_shift 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tok = fh.gemma_tokenizer()
    gemma = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=2, num_hidden_layers=1, vocab_size=len(tok),
                                     max_position_embeddings=8192, attn_implementation="eager")).eval()
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
                                         num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=8, sample_size=SIZE)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    folder = tmp_path_factory.mktemp("sana") / "tiny-sana"
    SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer, scheduler=scheduler).save_pretrained(folder)
    return folder


def _stock_encode(folder, prompts, chi):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(folder)
    with torch.no_grad():  # as __call__ runs it
        return pipe.encode_prompt(prompts, True, negative_prompt="", device="cpu", clean_caption=False,
                                  max_sequence_length=300, complex_human_instruction=chi)


def test_conditioner_is_the_pipelines_encode_prompt(sana_dir):
    teacher = load_teacher(str(sana_dir), prompts=PROMPTS)
    assert teacher.denoiser.record.name == "sana" and teacher.denoiser.schedule.kind == "flow"
    assert teacher.sample_shape == (4, SIZE, SIZE)
    cond, null = teacher.conditioner.texts(PROMPTS)
    pe, pm, npe, npm = _stock_encode(sana_dir, PROMPTS, _chi())
    assert cond["prompt_embeds"].shape == (3, 300, 8) and torch.equal(cond["prompt_embeds"], pe)
    assert torch.equal(cond["prompt_attention_mask"], pm)
    assert torch.equal(null["prompt_embeds"], npe) and torch.equal(null["prompt_attention_mask"], npm)
    pe_plain = _stock_encode(sana_dir, PROMPTS, None)[0]  # the CHI choice is visible: without it the embeds differ
    assert (pe_plain - pe).abs().max() > 1e-3


def test_no_chi_from_metadata(sana_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-chi"
    shutil.copytree(sana_dir, folder)
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"complex_human_instruction": None, "max_sequence_length": 40}))
    cond, _ = load_teacher(str(folder), prompts=PROMPTS).conditioner.texts(PROMPTS)
    from diffusers import SanaPipeline

    pe, pm, _, _ = SanaPipeline.from_pretrained(folder).encode_prompt(PROMPTS, False, device="cpu", clean_caption=False,
                                                                      max_sequence_length=40, complex_human_instruction=None)
    assert cond["prompt_embeds"].shape[1] == 40 and torch.equal(cond["prompt_embeds"], pe)
    assert torch.equal(cond["prompt_attention_mask"], pm)


def _call(times, prompts=PROMPTS):
    return (f"prompt={prompts!r}, sigmas={list(times)!r}, guidance_scale=1.0, height={2 * SIZE}, width={2 * SIZE}, "
            "use_resolution_binning=False, clean_caption=False, max_sequence_length=300")


def _toolkit(run, prompts=PROMPTS):
    pe, pm, _, _ = _stock_encode(run.parent / "export", prompts, _chi())  # the exported pipeline's own encoding
    return fh.toolkit_latents(run, {"prompt_embeds": pe, "prompt_attention_mask": pm}, seed=0)


@pytest.mark.parametrize("times", [[1.0], [1.0, 0.75, 0.5, 0.25]])
def test_export_replays_the_student(tmp_path, sana_dir, times):
    run = fh.train(tmp_path, sana_dir, "digits-sd/dmd2", times, PROMPTS, *FLOW, "student.lr=1e-3", "fake_score.lr=1e-3")
    out = tmp_path / "export"
    meta = export_run(run, out)
    assert meta["pipeline"] == "SanaPipeline" and meta["call"][str(len(times))]["sigmas"] == times
    stock = fh.stock_latents(out, "SanaPipeline", _call(times), tmp_path / "stock.safetensors")
    ours = _toolkit(run)
    assert stock.shape == ours.shape == (3, 4, SIZE, SIZE)
    assert (stock - ours).abs().max() <= fh.TOL
    assert (ours - fh.toolkit_latents(run, {"prompt_embeds": torch.zeros(3, 300, 8)}, 0)).abs().max() > 1e-4  # prompts matter
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0


def test_lora_student_round_trips_through_load_lora_weights(tmp_path, sana_dir):
    times = [1.0, 0.5]
    run = fh.train(tmp_path, sana_dir, "digits-sd/dmd2", times, PROMPTS, *FLOW, "student.init=lora", "student.lora_rank=4", "student.lr=1e-2", "fake_score.lr=1e-3")
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    assert meta["lora_file"].endswith("pytorch_lora_weights.safetensors")
    ours = _toolkit(run)
    merged = fh.stock_latents(out, "SanaPipeline", _call(times), tmp_path / "merged.safetensors")
    adapter = fh.stock_lora_latents(sana_dir, out / "lora", out / "scheduler", "SanaPipeline", _call(times),
                                    tmp_path / "lora.safetensors")
    assert (merged - ours).abs().max() <= fh.TOL and (adapter - ours).abs().max() <= fh.TOL
    base = fh.stock_lora_latents(sana_dir, None, out / "scheduler", "SanaPipeline", _call(times), tmp_path / "base.safetensors")
    assert (base - ours).abs().max() > 1e-4  # the adapter changed the network


def test_sana_sprint_is_refused(sana_dir, tmp_path):
    import shutil

    folder = tmp_path / "sprint"
    shutil.copytree(sana_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "SanaSprintPipeline"}))
    with pytest.raises(StepdistillError, match="SANA-Sprint"):
        load_teacher(str(folder), prompts=PROMPTS)
