"""SANA end to end on a tiny random SanaPipeline (families.md 7, 11, 12).

The conditioner's embeddings are ``SanaPipeline.encode_prompt``'s (with ``__call__``'s default
complex human instruction); 1- and 4-step students, two rounds each, export as a stock
``SanaPipeline`` folder that a fresh process (no stepdistill) runs with ``sigmas=`` to the
toolkit's own latents; a LoRA student round-trips through ``SanaPipeline.load_lora_weights`` on the teacher folder.
"""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

import family_harness as fh
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run
from stepdistill.teachers import load_teacher

PROMPTS = ["a red circle", "Two Blue Squares", "a cat"]
SMALL = ("teacher.dtype=fp32", 'train.mixed_precision="no"', "train.gradient_checkpointing=false", "student.lora_rank=4",
         "fake_score.lora_rank=4")  # the shipped recipes' real-model settings, shrunk for CPU
FLOW = ("objective.critic_weighting=flow", "objective.critic_ratio=1")
SIZE = 16  # latent side; AutoencoderDC below has f = 2: the stock call asks for 32 x 32 pixels (SANA wants multiples of 32)


def _chi():
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def build_sana(folder):
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
    SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer, scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    return build_sana(tmp_path_factory.mktemp("sana") / "tiny-sana")


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


def _replays(tmp_path, run, times):
    out = tmp_path / "export"
    meta = export_run(run, out)
    assert meta["pipeline"] == "SanaPipeline" and meta["call_kwargs"][str(len(times))]["sigmas"] == times
    assert f"sigmas={times!r}, guidance_scale=1.0" in (out / "README.md").read_text()
    stock = fh.stock_latents(out, "SanaPipeline", _call(times), tmp_path / "stock.safetensors")
    ours = _toolkit(run)
    assert stock.shape == ours.shape == (3, 4, SIZE, SIZE)
    assert (stock - ours).abs().max() <= fh.TOL
    assert (ours - fh.toolkit_latents(run, {"prompt_embeds": torch.zeros(3, 300, 8)}, 0)).abs().max() > 1e-4  # prompts matter
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0


@pytest.mark.parametrize("recipe, times", [("sana/dmd2", [1.0]), ("digits-sd/dmd2", [1.0, 0.75, 0.5, 0.25])])
def test_export_replays_the_student(tmp_path, sana_dir, recipe, times):
    """The shipped SANA recipe (LoRA student, merged at export) at one step; a full-copy student at four."""
    run = fh.train(tmp_path, sana_dir, recipe, times, PROMPTS, *FLOW, *SMALL, "student.lr=1e-3", "fake_score.lr=1e-3")
    _replays(tmp_path, run, times)


def test_scm_ladd_recipe_student_exports_as_sana(tmp_path, sana_dir):
    """The SANA-Sprint-style recipe trains a flow-time student, which exports as a plain SanaPipeline."""
    import yaml

    from stepdistill.config import resolve_recipe

    recipe = yaml.safe_load(resolve_recipe("sana/scm-ladd").read_text())
    for part in recipe["objective"]["parts"]:
        part |= {"synthetic_pool": 4, "synthetic_steps": 2}  # a tiny teacher-sample pool: seconds, not minutes
    (tmp_path / "scm-ladd.yaml").write_text(yaml.safe_dump(recipe))
    run = fh.train(tmp_path, sana_dir, str(tmp_path / "scm-ladd.yaml"), [1.0], PROMPTS, *SMALL)
    _replays(tmp_path, run, [1.0])


def test_lora_student_round_trips_through_load_lora_weights(tmp_path, sana_dir):
    times = [1.0, 0.5]
    run = fh.train(tmp_path, sana_dir, "digits-sd/dmd2", times, PROMPTS, *FLOW, "student.init=lora", "student.lora_rank=4", "student.lr=1e-2", "fake_score.lr=1e-3")
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    assert meta["lora_file"].endswith("pytorch_lora_weights.safetensors")
    ours = _toolkit(run)
    merged = fh.stock_latents(out, "SanaPipeline", _call(times), tmp_path / "merged.safetensors")
    base = tmp_path / "teacher-base"  # the teacher with the export's scheduler, as the card says
    shutil.copytree(sana_dir, base)
    shutil.rmtree(base / "scheduler")
    shutil.copytree(out / "scheduler", base / "scheduler")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    adapter = fh.stock_latents(out, "SanaPipeline", _call(times), tmp_path / "lora.safetensors", load_lora=out / "lora", base=base)
    assert (merged - ours).abs().max() <= fh.TOL and (adapter - ours).abs().max() <= fh.TOL
    assert _weight_change(sana_dir, out) > 0  # the adapter changed the network


def _weight_change(teacher, out) -> float:
    from safetensors.torch import load_file

    a, b = (load_file(str(f / "transformer" / "diffusion_pytorch_model.safetensors")) for f in (teacher, out))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sana_sprint_is_refused(sana_dir, tmp_path):
    folder = tmp_path / "sprint"
    shutil.copytree(sana_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "SanaSprintPipeline"}))
    with pytest.raises(StepdistillError, match="SANA-Sprint"):
        load_teacher(str(folder), prompts=PROMPTS)
