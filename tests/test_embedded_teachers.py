"""The shipped digits assets: data split, feature network, and the digits-unet teacher."""

import math

import pytest
import torch

from stepdistill.conditioning import ClassLabels
from stepdistill.training.data.digits import load_digits_images
from stepdistill.evaluation.digits_classifier import load_digits_classifier
from stepdistill.sampling import ddim_sample
from stepdistill.teachers import assets_dir, list_teachers, load_teacher


def test_digits_split_is_disjoint_and_stratified():
    train, ytr = load_digits_images("train")
    test, yte = load_digits_images("test")
    assert train.shape == (1437, 1, 16, 16) and test.shape == (360, 1, 16, 16)
    assert train.min() >= -1 and train.max() <= 1
    assert torch.cdist(test.flatten(1), train.flatten(1)).min() > 0  # no test image is in the train split
    assert torch.bincount(yte, minlength=10).min() >= 30


def test_feature_network_accuracy_on_held_out_digits():
    net = load_digits_classifier().eval()
    x, y = load_digits_images("test")
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
        feats = net.features(x[:4])
    assert acc >= 0.97 and feats.shape == (4, net.num_features)


def test_digits_unet_loads_with_stock_diffusers_and_our_loader():
    from diffusers import DDIMScheduler, UNet2DModel

    folder = assets_dir() / "teachers" / "digits-unet"
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert unet.config.num_class_embeds == 11 and scheduler.config.prediction_type == "epsilon"
    assert "digits-unet" in dict(list_teachers())
    teacher = load_teacher("digits-unet")
    assert teacher.sample_shape == (1, 16, 16) and teacher.denoiser.family == "unet2d"
    assert isinstance(teacher.conditioner, ClassLabels) and teacher.conditioner.null_class == 10
    cond, null = teacher.conditioner.labelled(torch.arange(4))
    x = ddim_sample(teacher.denoiser, torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), cond, 3,
                    null, guidance_scale=2.0)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()


def _accuracy(teacher, labels, steps, guidance, prompts=None):
    """Classifier accuracy of seeded teacher samples through our loader and the contract sampler."""
    if prompts is None:
        cond, null = teacher.conditioner.labelled(labels)
    else:
        cond, null = teacher.conditioner.texts(prompts)
    g = torch.Generator().manual_seed(0)
    x = ddim_sample(teacher.denoiser, torch.randn(len(labels), *teacher.sample_shape, generator=g), cond, steps, null,
                    guidance_scale=guidance)
    if teacher.decode is not None:
        x = teacher.decode(x).mean(1, keepdim=True)  # the RGB digit back to gray
    return (load_digits_classifier().predict(x.clamp(-1, 1)) == labels).float().mean().item()


def test_digits_flow_through_our_loader_draws_the_asked_digits():
    teacher = load_teacher("digits-flow")
    assert teacher.denoiser.family == "dit" and teacher.denoiser.schedule.kind == "flow"
    assert teacher.sample_shape == (1, 16, 16) and teacher.conditioner.null_class == 10
    labels = torch.arange(30) % 10
    assert _accuracy(teacher, labels, 20, teacher.info["recommended_guidance_scale"]) >= 0.8


def test_digits_sd_through_our_loader_draws_the_asked_digits():
    from stepdistill.training.data.digits import DIGIT_WORDS

    teacher = load_teacher("digits-sd")
    assert teacher.denoiser.family == "sd" and teacher.sample_shape == (4, 8, 8)
    labels = torch.arange(30) % 10
    prompts = [f"a handwritten digit {DIGIT_WORDS[i]}" for i in labels.tolist()]
    assert _accuracy(teacher, labels, 20, teacher.info["recommended_guidance_scale"], prompts) >= 0.8


def test_a_teacher_folder_with_its_own_text_encoder(tmp_path):
    """SD1.5-style folders carry text_encoder/ + tokenizer/: those encode the prompts, not MiniLM."""
    import json

    import transformers
    from diffusers import DDPMScheduler

    from stepdistill.config import load_config
    from stepdistill.contract import StepdistillError
    from stepdistill.teachers import load_teacher, text_encoder_minilm
    from stepdistill.training.trainer import Trainer
    from conftest import tiny_unet2d_condition

    folder = tmp_path / "sd-own-encoder"
    torch.manual_seed(0)
    unet = tiny_unet2d_condition()  # cross_attention_dim 8
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    _, tokenizer = text_encoder_minilm()
    tokenizer.model_max_length = 77  # as a CLIP tokenizer: the stock pipeline pads to it
    tokenizer.save_pretrained(folder / "tokenizer")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16,
                                                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    clip.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))
    prompts = ["a handwritten digit seven", "the digit 3"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    teacher = load_teacher(str(folder), prompts=prompts)
    cond, null = teacher.conditioner.texts(prompts)
    assert cond["prompt_embeds"].shape == (2, 77, 8) and null["prompt_embeds"].shape == (2, 77, 8)
    cfg = load_config("digits-sd/dmd2", [f"teacher.name={folder}", "train.batch_size=2", "train.steps=1", "train.sample_every=0",
                                         f"data.conditions=prompts:{tmp_path / 'prompts.txt'}"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    logs = tr.update("student")
    assert all(math.isfinite(v) for v in logs.values())
    import shutil

    shutil.rmtree(folder / "text_encoder")  # without its own encoder (no package named in its metadata): one clear line
    with pytest.raises(StepdistillError, match="has no text_encoder/"):
        load_teacher(str(folder), prompts=prompts)
    with pytest.raises(StepdistillError, match="give prompts with data.conditions=prompts:<file>"):  # issue 14: no digit captions
        (folder / "text_encoder").mkdir()
        clip.save_pretrained(folder / "text_encoder")
        load_teacher(str(folder))


def test_digits_vunet_a_teacher_of_another_kind_loads_and_draws_the_asked_digits(capsys):
    """The fourth embedded teacher (issue 17): v-prediction, scaled-linear betas, ten real classes and no null class."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = assets_dir() / "teachers" / "digits-vunet"
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert unet.config.num_class_embeds == 10 and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and "digits-vunet" in dict(list_teachers())
    teacher = load_teacher("digits-vunet")
    assert teacher.denoiser.schedule.kind == "vp" and teacher.conditioner.null_class is None
    assert teacher.info["recommended_guidance_scale"] == 1.0
    labels = torch.arange(30) % 10
    assert _accuracy(teacher, labels, 20, 1.0) >= 0.8


def test_a_digits_unet_recipe_runs_on_digits_vunet_with_the_teacher_name_changed(tmp_path):
    """student.sigmas carry SiD's noise level over to the other schedule; no CFG on a teacher without a null class."""
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    cfg = load_config("digits-unet/sid", ["teacher.name=digits-vunet", "train.batch_size=4", "train.steps=1",
                                          "train.sample_every=0", "train.num_sample_images=4"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert (cfg.objective.guidance_scale, cfg.objective.fake_guidance_scale, cfg.objective.fake_train_guidance_scale) == (1, 1, 1)
    assert round(tr.nets.student_times[0] * 999) == 625  # EDM sigma 2.5 on SD's scaled-linear betas (755 on digits-unet)
    logs = tr.update("student")
    assert all(math.isfinite(v) for v in logs.values())
    tr.release()
