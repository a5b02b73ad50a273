"""Scale levers: the memory plan (on an SD1.5-sized config, no weights), gradient checkpointing,
attention backend choice, teacher offload rules."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.contract import StepdistillError
from stepdistill.training.memory import choose_attention
from stepdistill.plan import device_memory, estimate
from stepdistill.training.trainer import Trainer


@pytest.fixture(scope="module")
def sd15_config_dir(tmp_path_factory):
    """An SD1.5-shaped UNet2DConditionModel folder with config files only (no weights)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(unet.to_json_string())
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    return folder


def test_plan_sd15_full_vs_lora(sd15_config_dir):
    base = [f"teacher.name={sd15_config_dir}", "student.ema_decay=0"]  # the recipe's EMA copy would add 4 bytes/param
    full = estimate(load_config("digits-unet/dmd", base), batch_size=8, precision="bf16")
    params = {n["name"]: n for n in full["networks"]}
    assert params["teacher"]["params"] == 859_520_964  # SD1.5's UNet
    # full fp32 copies: 16 bytes per trained parameter each, plus the fp32 teacher (4 bytes)
    assert full["static_gib"] == pytest.approx((2 * 16 + 4) * 859_520_964 / 2**30, rel=1e-6)
    lora = estimate(load_config("digits-unet/dmd", base + ["student.init=lora", "fake_score.init=lora", "teacher.dtype=bf16"]),
                    batch_size=8, precision="bf16", checkpointing=True)
    lp = {n["name"]: n for n in lora["networks"]}
    assert 1e6 < lp["student"]["trained_params"] < 5e7  # rank-16 adapters
    assert lora["phases_activation_gib"]["student"] < full["phases_activation_gib"]["student"] / 2
    assert full["peak_gib"] > 24 > lora["peak_gib"]


def test_plan_prints_per_network_memory_for_an_sdxl_shaped_teacher(tmp_path, capsys):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device("meta"):  # SDXL's UNet layout (config only, nothing allocated)
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                                    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(unet.to_json_string())
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(tmp_path / "scheduler")
    assert main(["plan", "digits-sd/dmd2", f"teacher.name={tmp_path}", "--batch-size", "2", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "student", "fake_score"):
        assert any(line.startswith(name) and "GiB" in line for line in out.splitlines()), (name, out)
    assert "2562.2M" in out  # SDXL UNet layout with 2048-d cross-attention, without the micro-conditioning embedding


def test_plan_cli_exit_codes(sd15_config_dir, capsys):
    args = ["plan", "digits-unet/dmd", f"teacher.name={sd15_config_dir}", "--batch-size", "8", "--precision", "bf16"]
    assert main(args + ["--device", "24GB"]) == 1
    assert "WILL NOT FIT a 24 GiB device" in capsys.readouterr().out
    assert main(args + ["student.init=lora", "fake_score.init=lora", "--device", "a100-80gb"]) == 0
    assert "fits a 80 GiB device" in capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher_class"] == "UNet2DConditionModel"
    assert main(["plan", "toy2d/dmd"]) == 2
    assert "analytic" in capsys.readouterr().err
    with pytest.raises(StepdistillError, match="give a size"):
        device_memory("big")


def _grads(tmp_path, unet_teacher_dir, name, *extra):
    cfg = load_config("digits-unet/dmd", [f"teacher.name={unet_teacher_dir}", "train.batch_size=4", "train.steps=1",
                                          "train.sample_every=0", *extra])
    tr = Trainer(cfg, tmp_path / name, progress=False)
    tr.update("fake_score")
    return [p.grad.clone() for p in tr.trainables["fake_score"].params if p.grad is not None], tr


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, unet_teacher_dir):
    plain, _ = _grads(tmp_path, unet_teacher_dir, "a")
    ckpt, tr = _grads(tmp_path, unet_teacher_dir, "b", "train.gradient_checkpointing=true")
    model = tr.trainables["fake_score"].module.model
    assert model.is_gradient_checkpointing and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_attention_backend_choice():
    assert choose_attention("auto", "cpu") == "sdpa"
    assert choose_attention("sdpa", "cpu") == "sdpa"
    with pytest.raises(StepdistillError, match="xformers"):
        choose_attention("xformers", "cpu")
    with pytest.raises(StepdistillError, match="must be one of"):
        choose_attention("flash", "cpu")


def test_teacher_offload_rules(tmp_path, unet_teacher_dir):
    with pytest.raises(StepdistillError, match="full-copy"):
        _grads(tmp_path, unet_teacher_dir, "c", "teacher.offload=true", "student.init=lora", "fake_score.init=lora")
    grads, _ = _grads(tmp_path, unet_teacher_dir, "d", "teacher.offload=true")  # CPU: nothing to offload, still trains
    assert grads


def test_fsdp_rules(tmp_path, unet_teacher_dir, capsys):
    with pytest.raises(StepdistillError, match="full-copy"):
        _grads(tmp_path, unet_teacher_dir, "e", "train.distributed=fsdp", "student.init=lora")
    with pytest.raises(StepdistillError, match="must be one of ddp, fsdp"):
        _grads(tmp_path, unet_teacher_dir, "f", "train.distributed=deepspeed")
    grads, _ = _grads(tmp_path, unet_teacher_dir, "g", "train.distributed=fsdp")  # CPU: accelerate cannot shard
    assert grads and "training unsharded" in capsys.readouterr().out


def test_gradient_checkpointing_through_two_lora_views_of_one_base(tmp_path, unet_teacher_dir):
    """SiD's student loss backpropagates through the teacher (adapters off) and the fake score (its
    LoRA) on one shared base: the checkpointed recomputation must see each view's own routing."""

    def student_grads(name, *extra):
        cfg = load_config("digits-unet/sid", [f"teacher.name={unet_teacher_dir}", "train.batch_size=4", "train.steps=1",
                                              "train.sample_every=0", "student.init=lora", "fake_score.init=lora",
                                              "objective.guidance_scale=1", "objective.fake_guidance_scale=1", *extra])
        tr = Trainer(cfg, tmp_path / name, progress=False)
        for p in tr.trainables["fake_score"].params:  # a fake score unlike the teacher, so the routing matters
            torch.nn.init.normal_(p, std=0.05)
        tr.update("student")
        return [p.grad.clone() for p in tr.trainables["student"].params if p.grad is not None]

    plain = student_grads("a")
    ckpt = student_grads("b", "train.gradient_checkpointing=true")
    assert len(plain) == len(ckpt) > 0 and any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_gives_the_same_gradients_and_checkpoints(tmp_path, unet_teacher_dir):
    """train.compile compiles every network in place: same gradients (fake-score phase; the student phase
    of SiD backpropagates through the compiled teacher and fake score), same state_dict keys, and a
    backend typo is a one-line error. aot_eager: dynamo + autograd tracing without a C++ toolchain."""
    from torch._dynamo.utils import counters

    plain, _ = _grads(tmp_path, unet_teacher_dir, "a")
    counters.clear()
    compiled, tr = _grads(tmp_path, unet_teacher_dir, "b", "train.compile=aot_eager")
    assert counters["stats"]["unique_graphs"] > 0, "dynamo captured no graph: the networks ran eager"
    model = tr.trainables["fake_score"].module.model
    assert model._compiled_call_impl is not None and tr.teacher.denoiser.model._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert len(plain) == len(compiled) > 0
    for a, b in zip(plain, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(StepdistillError, match="train.compile must be one of"):
        load_config("digits-unet/dmd", ["train.compile=inductr"])
    for name, extra in (("c", ()), ("d", ("train.compile=aot_eager",))):
        cfg = load_config("digits-unet/sid", [f"teacher.name={unet_teacher_dir}", "train.batch_size=4", "train.steps=1",
                                              "train.sample_every=0", *extra])
        sid = Trainer(cfg, tmp_path / name, progress=False)
        sid.update("student")
        grads = [p.grad.clone() for p in sid.trainables["student"].params if p.grad is not None]
        if name == "c":
            eager = grads
    for a, b in zip(eager, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
