"""SD1.5 / SD2.x end to end on a real (tiny, random) ``StableDiffusionPipeline`` folder.

The folder is built here with the configs of diffusers' own fast tests (families.md section 11):
tiny ``UNet2DConditionModel``, ``CLIPTextModel`` (vocab 1000, eos 2), an offline CLIP BPE
tokenizer, tiny ``AutoencoderKL``, DDIM scheduler, ``save_pretrained``.

* conditions: the toolkit's conditioner equals ``StableDiffusionPipeline.encode_prompt`` (the
  positive branch and the negative branch of ``""``), bit for bit;
* parity: 1- and 4-step DMD2 students (epsilon, and a v-prediction SD2-768-style teacher) export
  to a stock folder whose ``StableDiffusionPipeline`` (fresh process, no stepdistill) gives the
  toolkit's latents to ``TOL``; a LoRA student's ``lora/`` on the teacher folder equals the merge;
* every shipped ``digits-sd`` recipe trains one round and exports;
* the LCM clean-sample pool is built lazily (2 rounds take seconds) and reproducibly;
* ``teacher.name=org/name`` resolves from the local Hugging Face cache, offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import family_harness as fh
from stepdistill.contract import StepdistillError
from stepdistill.export import export_run

PROMPTS = ["a photo of a cat", "a red car on a road", "an astronaut riding a horse"]
FOUR = [1.0, 0.75, 0.5, 0.25]
CPU = ("teacher.dtype=fp32", "train.mixed_precision='no'", "train.gradient_checkpointing=false")  # the sd15 recipes' GPU settings off
FAST = (*CPU, "objective.critic_ratio=1", "student.lr=1e-3", "fake_score.lr=1e-3", "student.warmup_steps=0",
        "fake_score.warmup_steps=0")  # tiny nets: large steps so 2 rounds move the weights


def write_sd_folder(folder: Path, prediction_type: str = "epsilon", sample_size: int = 8) -> Path:
    """A tiny SD1.5-style (or SD2-768-style with ``v_prediction``) pipeline folder via ``save_pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5,
                                        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000)).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=fh.clip_tokenizer(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd15") / "tiny-sd15")


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("sd2v") / "tiny-sd2-768", prediction_type="v_prediction")


def stock_pipe(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_embeds(folder: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) prompt embeddings from the stock pipeline's own ``encode_prompt``."""
    with torch.no_grad():
        return stock_pipe(folder).encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)


# ------------------------------------------------------------------------------ 1. conditions


def test_conditioner_is_the_pipelines_encode_prompt(sd15):
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(sd15), prompts=PROMPTS)
    cond, null = teacher.conditioner.texts(PROMPTS[::-1])
    pe, npe = pipeline_embeds(sd15, PROMPTS[::-1])
    assert cond["prompt_embeds"].shape == pe.shape == (3, 77, 8)
    assert torch.equal(cond["prompt_embeds"], pe)
    assert torch.equal(null["prompt_embeds"], npe)
    # the old path passed the tokenizer's attention mask; CLIP's encode_prompt passes none, and it matters
    pipe = stock_pipe(sd15)
    tok = pipe.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        masked = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    assert not torch.allclose(masked, cond["prompt_embeds"][2:3], atol=1e-6)
    assert teacher.denoiser.prediction_type == "epsilon" and teacher.sample_shape == (4, 8, 8)


# ------------------------------------------------------------------------------ 2. export parity


def test_off_grid_student_error_names_the_grid_from_its_first_step():
    """A four-step student at 624/499/374/249 is off every LCMScheduler grid: the error gives the grid starting at 624."""
    from stepdistill.adapters.families.sd import check_lcm_grid

    with pytest.raises(StepdistillError, match=r"from this student's first step 624: student.times=\[0.624624625, "
                                               r"0.468468468, 0.312312312, 0.156156156\] \(timesteps \[624, 468, 312, 156\], "
                                               r"original_inference_steps=625\)"):
        check_lcm_grid({4: [s / 999 for s in (624, 499, 374, 249)]}, 1000, "StableDiffusionPipeline")
    assert check_lcm_grid({4: [s / 999 for s in (624, 468, 312, 156)]}, 1000, "StableDiffusionPipeline") == 625


def stock_vs_toolkit(tmp_path: Path, run: Path, export: Path, n_steps: int, **lora) -> tuple[torch.Tensor, torch.Tensor]:
    """(stock StableDiffusionPipeline latents from a clean process, the toolkit's for the same embeddings and seed)."""
    prompts = PROMPTS[:2]
    stock = fh.stock_latents(export, "StableDiffusionPipeline", f"prompt={prompts!r}, num_inference_steps={n_steps}",
                             tmp_path / f"stock-{n_steps}-{bool(lora)}.safetensors", **lora)
    pe, _ = pipeline_embeds(export, prompts)
    return stock, fh.toolkit_latents(run, {"prompt_embeds": pe}, seed=0)


AT_625 = [s / 999 for s in (625, 469, 312, 156)]  # LCMScheduler(original_inference_steps=626)'s four steps


@pytest.mark.parametrize("times", [[1.0], FOUR, [625 / 999], AT_625], ids=["1step", "4step", "1step-at-625", "4step-at-625"])
def test_dmd2_student_replays_in_stock_pipeline(tmp_path, sd15, times):
    """Also students whose first step is 625 (EDM sigma 2.5, SiD's input): LCMScheduler(original_inference_steps=626)."""
    from diffusers import LCMScheduler

    run = fh.train(tmp_path, sd15, "sd15/dmd2", times, PROMPTS, *FAST)
    meta = export_run(run, tmp_path / "export")
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["text_encoder_in_folder"]
    assert meta["lcm_original_inference_steps"] == (626 if times[0] < 1 else 1000)
    sched = LCMScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    sched.set_timesteps(len(times))
    assert [int(t) for t in sched.timesteps] == [round(t * 999) for t in meta["student_times"][str(len(times))]]
    stock, ours = stock_vs_toolkit(tmp_path, run, tmp_path / "export", len(times))
    assert stock.shape == ours.shape == (2, 4, 8, 8)
    assert (stock - ours).abs().max() <= fh.TOL


def test_v_prediction_teacher_trains_exports_and_replays(tmp_path, sd2v):
    from stepdistill.teachers import load_teacher

    assert load_teacher(str(sd2v), prompts=PROMPTS).denoiser.prediction_type == "v_prediction"
    run = fh.train(tmp_path, sd2v, "sd15/dmd2", FOUR, PROMPTS, *FAST)
    export_run(run, tmp_path / "export")
    assert fh.export_meta(tmp_path / "export")["scheduler"] == "LCMScheduler"
    stock, ours = stock_vs_toolkit(tmp_path, run, tmp_path / "export", 4)
    assert (stock - ours).abs().max() <= fh.TOL


def test_lora_student_loads_on_the_teacher_folder(tmp_path, sd15):
    run = fh.train(tmp_path, sd15, "sd15/dmd2", [1.0], PROMPTS, *FAST, "student.init=lora", "fake_score.init=lora",
                   "student.lora_rank=2", "fake_score.lora_rank=2", "student.lr=1e-2")
    export = tmp_path / "export"
    meta = export_run(run, export, lora=True)
    assert Path(meta["lora_file"]).parent == export / "lora"
    merged, ours = stock_vs_toolkit(tmp_path, run, export, 1)
    assert (merged - ours).abs().max() <= fh.TOL
    # the teacher folder + its own scheduler swapped for LCM (as the model card says) + load_lora_weights
    teacher_lcm = tmp_path / "teacher-lcm"
    pipe = stock_pipe(sd15)
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000, clip_sample=False)
    pipe.save_pretrained(teacher_lcm)
    lora = fh.stock_latents(export, "StableDiffusionPipeline", f"prompt={PROMPTS[:2]!r}, num_inference_steps=1, guidance_scale=1.0",
                            tmp_path / "lora.safetensors", load_lora=export / "lora", base=teacher_lcm)
    base = fh.stock_latents(teacher_lcm, "StableDiffusionPipeline", f"prompt={PROMPTS[:2]!r}, num_inference_steps=1, guidance_scale=1.0",
                            tmp_path / "base.safetensors")
    assert (lora - merged).abs().max() <= fh.TOL
    assert (base - merged).abs().max() > 1e-3, "the adapter must change the teacher's output"


# ------------------------------------------------------------------------------ 4. LCM sample pool


def lcm_run(tmp_path: Path, folder: Path, name: str, *extra: str) -> tuple[Path, float]:
    start = time.perf_counter()
    run = fh.train(tmp_path, folder, "sd15/lcm", [1.0], PROMPTS, *CPU, "student.lora_rank=2", "objective.synthetic_steps=4",
                   *extra, name=name)
    return run, time.perf_counter() - start


def lora_weights(run: Path) -> dict:
    from stepdistill.training.run import load_student

    return load_student(run).lora_state()


def test_lcm_pool_is_lazy_and_reproducible(tmp_path, sd15, capsys):
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    run_a, seconds = lcm_run(tmp_path, sd15, "a")
    run_b, _ = lcm_run(tmp_path, sd15, "b")
    with capsys.disabled():
        print(f"\n2-round sd15/lcm (LoRA, pool 512, batch 2) on the tiny SD1.5 folder: {seconds:.1f} s")
    a, b = lora_weights(run_a), lora_weights(run_b)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resume: 1 round, then the 2nd from the checkpoint, equals 2 rounds straight (the pool is rebuilt from its seed)
    run_c, _ = lcm_run(tmp_path, sd15, "c", "train.steps=1")
    Trainer(load_config(str(run_c / "config.yaml"), ["train.steps=2"]), run_c, resume=True, progress=False).run()
    c = lora_weights(run_c)
    assert all(torch.equal(a[k], c[k]) for k in a)
    fresh, _ = lcm_run(tmp_path, sd15, "d", "train.seed=1")
    assert any(not torch.equal(a[k], v) for k, v in lora_weights(fresh).items())


def test_clean_sample_pool_builds_only_what_batches_need():
    from stepdistill.analytic import ring2d
    from stepdistill.objectives.base import Batch
    from stepdistill.objectives.consistency.common import CleanSamples
    from stepdistill.schedules import FlowSchedule
    from types import SimpleNamespace

    teacher = ring2d(FlowSchedule())
    nets = SimpleNamespace(teacher=teacher)
    batch = Batch(4, (2,), {}, None)
    pool, again = CleanSamples(pool=64, steps=2), CleanSamples(pool=64, steps=2)
    rng, rng2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x, _, source = pool.draw(nets, batch, rng)
    assert source == "teacher" and x.shape == (4, 2) and pool.built() == 4  # one chunk, not 64 samples
    for _ in range(200):
        pool.draw(nets, batch, rng)
    assert pool.built() == 64  # grown to the whole pool, never beyond
    for _ in range(5):  # a second pool with the same seed, built in another order, gives the same samples
        again.draw(nets, batch, torch.Generator().manual_seed(_ + 100))
    y1, _, _ = pool.draw(nets, batch, rng2.manual_seed(7))
    y2, _, _ = again.draw(nets, batch, torch.Generator().manual_seed(7))
    assert torch.equal(y1, y2)



def test_lcm_lora_student_exports_one_two_and_four_steps(tmp_path, sd15):
    """A consistency student exports any step count on LCMScheduler's grid; the stock 4-step call replays it."""
    from stepdistill.export import lcm_grid
    from stepdistill.sampling import few_step_sample
    from stepdistill.training.run import load_student

    run, _ = lcm_run(tmp_path, sd15, "lcm", "student.lr=1e-2")
    export = tmp_path / "export"
    meta = export_run(run, export, steps=[1, 2, 4], lora=True)
    assert meta["steps"] == [1, 2, 4] and (export / "lora" / "pytorch_lora_weights.safetensors").is_file()
    times = meta["student_times"]["4"]
    assert [round(t * 999) for t in times] == lcm_grid(4)
    stock = fh.stock_latents(export, "StableDiffusionPipeline", f"prompt={PROMPTS[:2]!r}, num_inference_steps=4",
                             tmp_path / "stock.safetensors")
    pe, _ = pipeline_embeds(export, PROMPTS[:2])
    student = load_student(run)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, *student.teacher.sample_shape, generator=g)
    with torch.no_grad():
        ours = few_step_sample(student.view, noise, {"prompt_embeds": pe}, times, g)
    assert (stock - ours).abs().max() <= fh.TOL


# ------------------------------------------------------------------------------ 5. model ids


def fake_hub_cache(root: Path, repo_id: str, files_from: Path | None = None, revision: str = "0" * 40) -> Path:
    """``root`` laid out as the hub cache holds ``repo_id``: models--org--name/{refs/main, snapshots/<hash>/...}."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if files_from is not None:
        shutil.copytree(files_from, snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_model_ids_resolve_from_the_local_hub_cache(tmp_path, sd15, monkeypatch):
    from stepdistill.teachers import load_teacher, resolve_teacher_folder

    cache = tmp_path / "hub"
    sdxl = fake_hub_cache(cache, "stabilityai/stable-diffusion-xl-base-1.0")
    tiny = fake_hub_cache(cache, "tiny-org/tiny-sd15", files_from=sd15, revision="a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_teacher_folder("stabilityai/stable-diffusion-xl-base-1.0") == sdxl
    assert resolve_teacher_folder(f"tiny-org/tiny-sd15@{'a' * 40}") == tiny
    teacher = load_teacher("tiny-org/tiny-sd15", prompts=PROMPTS)
    assert teacher.folder == tiny and teacher.name == "tiny-org/tiny-sd15"
    with pytest.raises(StepdistillError, match=r"'stabilityai/sdxl-turbo' is not a folder and not in the local Hugging "
                                               r"Face cache .*hf download stabilityai/sdxl-turbo.*or give a folder"):
        resolve_teacher_folder("stabilityai/sdxl-turbo")
    with pytest.raises(StepdistillError, match="does not exist"):
        resolve_teacher_folder(str(tmp_path / "no" / "such" / "folder"))
    # a run names the id; training and export resolve it the same way
    run = fh.train(tmp_path, "tiny-org/tiny-sd15", "sd15/dmd2", [1.0], PROMPTS, *FAST)
    assert export_run(run, tmp_path / "export")["teacher"] == "tiny-org/tiny-sd15"


# ------------------------------------------------------------------------------ 3. digits-sd recipes


def digits_sd_recipes() -> list[str]:
    from stepdistill.config import list_recipes

    return [r for r in list_recipes() if r.startswith("digits-sd/")]


def test_digits_sd_recipes_are_listed():
    assert {"digits-sd/dmd2", "digits-sd/dmd2-4step", "digits-sd/lcm", "digits-sd/ladd"} <= set(digits_sd_recipes())


@pytest.mark.parametrize("recipe", digits_sd_recipes())
def test_every_digits_sd_recipe_trains_and_exports(tmp_path, recipe):
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    over = ["train.steps=1", "train.batch_size=2", "train.sample_every=0", "train.log_every=1", "train.checkpoint_every=0"]
    cfg = load_config(recipe, over)
    if hasattr(cfg.objective, "critic_ratio"):
        cfg.objective.critic_ratio = 1
    Trainer(cfg, tmp_path / "run", progress=False).run()
    meta = export_run(tmp_path / "run", tmp_path / "export")
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["steps"] == [len(cfg.student.times)]
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# ------------------------------------------------------------------------------ real data for a latent teacher


def test_image_folder_is_encoded_lazily_for_the_sd_teacher(tmp_path, sd15):
    import numpy as np
    from PIL import Image

    from stepdistill.teachers import load_teacher
    from stepdistill.training.data import ImageFolderLatents, load_real, read_images

    images = tmp_path / "images"
    images.mkdir()
    rs = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray(rs.randint(0, 255, (24, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    teacher = load_teacher(str(sd15), prompts=PROMPTS)
    real = load_real(str(images), teacher, teacher.sample_shape)
    assert isinstance(real, ImageFolderLatents) and len(real) == 5 and real.pixel_shape == (3, 16, 16)
    x, labels = real.draw(3, torch.Generator().manual_seed(1))
    assert x.shape == (3, 4, 8, 8) and labels is None
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 5, (3,), generator=g).tolist()
    want = teacher.codec.encode(read_images([real.files[i] for i in idx], (3, 16, 16)), g)
    assert torch.equal(x, want)
    # DMD2 stage 2 (GAN on real latents) runs on it
    run = fh.train(tmp_path, sd15, "sd15/dmd2", [1.0], PROMPTS, *FAST, "objective.gan_weight=1e-3", f"data.real={images}",
                   name="gan")
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("fake_score/gan_d_loss" in r for r in logs), logs
