"""``stepdistill eval`` on a text-to-image teacher: a tiny random SD1.5 folder, a 2-round student run of it
and its exported ``StableDiffusionPipeline``, all with ``--prompts``.

* CLIP score with a random-init open_clip model saved locally, FID / KID / precision / recall in the
  features of a random-init Inception file against an image folder written here: every row finite;
* no accuracy for a model that is not a digits model (the column is absent, the reason recorded);
* the exported pipeline, sampled through diffusers with the prompts, replays the run's student;
* the export's own ``call_kwargs`` (sigmas, guidance off, resolution) reach the pipeline call;
* missing or half-given pieces are one-line errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import family_harness as fh
from stepdistill.cli import main

PROMPTS = ["a photo of a cat", "a red car on a road", "an astronaut riding a horse"]
FAST = ("teacher.dtype=fp32", "train.mixed_precision='no'", "train.gradient_checkpointing=false", "objective.critic_ratio=1",
        "student.lr=1e-3", "fake_score.lr=1e-3", "student.warmup_steps=0", "fake_score.warmup_steps=0")


def write_sd_folder(folder: Path) -> Path:
    """A tiny SD1.5-style folder (configs of diffusers' fast tests, as tests/test_family_sd.py): 3 x 16 x 16 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5,
                                        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000)).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=fh.clip_tokenizer(), scheduler=sched,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def write_open_clip(folder: Path) -> Path:
    """A random-init open_clip model in open_clip's local-dir layout (as tests/test_evaluation.py)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def write_inception(path: Path) -> Path:
    """A random-init torch-fidelity Inception-v3 weights file (as tests/test_evaluation.py; nothing downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()
    mp.setattr(tfi.torch, "load", lambda *a, **k: {})
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    finally:
        mp.undo()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher folder, 2-round 1-step DMD2 run, its export, prompts file, open_clip folder, Inception file, image folder."""
    import numpy as np
    from PIL import Image

    from stepdistill.export import export_run

    root = tmp_path_factory.mktemp("evaltext")
    teacher = write_sd_folder(root / "tiny-sd15")
    run = fh.train(root, teacher, "sd15/dmd2", [1.0], PROMPTS, *FAST)
    export_run(run, root / "export")
    images = root / "images"
    images.mkdir()
    rs = np.random.RandomState(0)
    for i in range(8):
        Image.fromarray(rs.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    prompts = root / "eval-prompts.txt"
    prompts.write_text("a cat\n\na dog on a beach\na bowl of fruit\n")
    return {"teacher": teacher, "run": run, "export": root / "export", "images": images, "prompts": prompts,
            "clip": write_open_clip(root / "clip"), "inception": write_inception(root / "inception.pth"), "root": root}


def eval_args(world, out: Path, *extra: str) -> list[str]:
    return ["--steps", "1", "--solvers", "ddim", "--num-samples", "4", "--batch-size", "3", "--no-cost", "--out", str(out),
            "--cache-dir", str(world["root"] / "cache"), "--device", "cpu", *extra]


def one_line_error(capsys, argv: list[str], match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
    return err[0]


# ------------------------------------------------------------------------------ teacher + run + export


def test_eval_text_teacher_student_and_export_with_clip_and_fid(world, tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", str(world["teacher"]), str(world["run"]), str(world["export"]),
               *eval_args(world, out, "--prompts", str(world["prompts"]), "--clip-model", str(world["clip"]),
                          "--reference", str(world["images"]), "--inception-weights", str(world["inception"]))])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in records] == ["teacher", "student", "pipeline"]
    assert records[2]["info"]["pipeline"] == "StableDiffusionPipeline" and records[2]["info"]["scheduler"] == "LCMScheduler"
    for r in records:
        for key in ("fid", "kid", "precision", "recall", "vendi", "clip_cosine", "clip_score"):
            assert math.isfinite(r[key]), (r["label"], key)
        assert r["nfe"] == 1  # teacher at guidance 1 (no recommended scale), students without CFG
        assert r["accuracy"] is None and "digits models" in r["protocol"]["metrics_skipped"]["accuracy"]
        assert "Inception-v3" in r["protocol"]["feature_network"] and r["protocol"]["reference_count"] == 8
        assert "3 prompts" in r["protocol"]["conditions"] and str(world["prompts"]) in r["protocol"]["conditions"]
    # the same seeds and prompts: the exported pipeline replays the run's student, the teacher differs
    assert records[1]["fid"] == pytest.approx(records[2]["fid"], rel=1e-3)
    assert records[1]["clip_cosine"] == pytest.approx(records[2]["clip_cosine"], abs=1e-3)
    assert records[0]["fid"] != pytest.approx(records[1]["fid"], rel=1e-2)
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model"))
    assert "FID" in header and "CLIP score" in header and "accuracy" not in header
    assert "## Metrics not measured" in report and "accuracy" in report


def test_exported_pipeline_replays_the_student_on_the_prompts(world):
    from stepdistill.evaluation.seeding import make_conditions
    from stepdistill.evaluation.sources import pipeline_sampler, student_sampler, use_prompts

    prompts = ["a cat", "a dog on a beach", "a bowl of fruit"]
    student = use_prompts(student_sampler(world["run"]), prompts)
    pipe = use_prompts(pipeline_sampler(world["export"], 1), prompts)
    conds = make_conditions(4, 3, prompts=prompts)
    assert sorted(set(conds.prompts)) == sorted(prompts)
    a = student.generate([3, 4, 5, 6], conds)
    b = pipe.generate([3, 4, 5, 6], conds)
    assert a.shape == b.shape == (4, 3, 16, 16)
    assert (a - b).abs().max() <= 1e-4
    other = make_conditions(4, 3, prompts=["a completely different prompt"])
    assert (student.generate([3, 4, 5, 6], other) - a).abs().max() > 1e-4  # the prompts do reach the student


def test_export_call_kwargs_reach_the_pipeline_call(world, tmp_path, monkeypatch):
    """A flow family's export writes sigmas / guidance_scale=1 / resolution per step count: they are what the call gets."""
    import shutil

    from stepdistill.evaluation import sources
    from stepdistill.evaluation.seeding import Conditions
    from stepdistill.contract import StepdistillError

    folder = tmp_path / "export"
    shutil.copytree(world["export"], folder)
    meta = json.loads((folder / "stepdistill_export.json").read_text())
    meta["steps"] = [1, 2]
    meta["call_kwargs"] = {"1": {"guidance_scale": 1.0, "height": 16, "width": 16},
                           "2": {"timesteps": [999, 499], "guidance_scale": 1.0, "height": 16, "width": 16}}
    (folder / "stepdistill_export.json").write_text(json.dumps(meta))
    from diffusers import StableDiffusionPipeline

    calls = []
    sampler = sources.pipeline_sampler(folder, 2, guidance_scale=5.0)
    pipe_call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda self, **kw: calls.append(kw) or pipe_call(self, **kw))
    x = sampler.generate([0, 1], Conditions(None, ["a cat", "a dog"]))
    assert x.shape == (2, 3, 16, 16) and sampler.guidance_scale == 1.0
    (kw,) = calls
    assert kw["timesteps"] == [999, 499] and kw["guidance_scale"] == 1.0 and kw["height"] == 16
    assert kw["prompt"] == ["a cat", "a dog"] and len(kw["generator"]) == 2 and kw["output_type"] == "pt"
    assert sources.export_steps(folder, [1, 2, 4]) == [1, 2]
    with pytest.raises(StepdistillError, match="replays its student at --steps 1 2 only"):
        sources.export_steps(folder, [4])
    with pytest.raises(StepdistillError, match="call arguments for steps 1, 2 only"):
        sources.pipeline_sampler(folder, 4)


# ------------------------------------------------------------------------------ what runs, what is skipped


def test_clip_only_skips_fid_and_says_why(world, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", str(world["teacher"]), *eval_args(world, out, "--prompts", str(world["prompts"]),
                                                               "--clip-model", str(world["clip"]))]) == 0
    (r,) = json.loads((out / "results.json").read_text())
    assert math.isfinite(r["clip_score"]) and r["fid"] is None and r["accuracy"] is None
    assert "--inception-weights" in r["protocol"]["metrics_skipped"]["fid"]
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| model"))
    assert "FID" not in header and "accuracy" not in header and "CLIP score" in header


def test_teacher_folder_is_a_teacher_and_export_a_pipeline(world):
    from stepdistill.evaluation.sources import model_kind

    assert model_kind(str(world["teacher"])) == "teacher"  # model_index.json of StableDiffusionPipeline, no export json
    assert model_kind(str(world["run"])) == "student"
    assert model_kind(str(world["export"])) == "pipeline"


def test_text_model_bad_input_is_one_line(world, tmp_path, capsys):
    out = tmp_path / "o"
    teacher, run, export = str(world["teacher"]), str(world["run"]), str(world["export"])
    for model in (teacher, run, export):
        one_line_error(capsys, ["eval", model, *eval_args(world, out, "--clip-model", str(world["clip"]))], "--prompts FILE")
    prompts = ("--prompts", str(world["prompts"]))
    one_line_error(capsys, ["eval", teacher, *eval_args(world, out, *prompts)], "nothing measures the quality")
    one_line_error(capsys, ["eval", teacher, *eval_args(world, out, *prompts, "--inception-weights", str(world["inception"]))],
                   "FID on text-to-image model")
    err = one_line_error(capsys, ["eval", run, *eval_args(world, out, *prompts, "--reference", str(world["images"]))],
                         "needs --inception-weights PATH")
    assert "text-to-image model" in err
    one_line_error(capsys, ["eval", teacher, *eval_args(world, out, "--prompts", str(tmp_path / "missing.txt"))],
                   "cannot read prompt file")
    (tmp_path / "empty.txt").write_text("\n\n")
    one_line_error(capsys, ["eval", teacher, *eval_args(world, out, "--prompts", str(tmp_path / "empty.txt"))], "no prompts")
    one_line_error(capsys, ["eval", export, *eval_args(world, out, *prompts, "--clip-model", str(world["clip"])), "--steps", "4"],
                   "replays its student at --steps 1")
