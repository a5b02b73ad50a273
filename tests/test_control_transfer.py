"""Control transfer (issue 16, item 4): a LoRA trained on the digits-sd teacher loads, with the stock
``load_lora_weights``, into the teacher and into an exported student, and moves both the same way.

What CI can and cannot show. The LoRA here is a real, if short, remap training (40 steps): the
teacher's prompt for 3 must then draw 8s. The student is a mechanism check only: a one-round LCM
run exported through ``export_run`` (the stock StableDiffusionPipeline with the export's
guidance projection and LCMScheduler), i.e. nearly the teacher's weights at one step. The test
asserts that the adapter fits it layer for layer, changes its samples and moves the remapped
fraction the same way; the effect on a trained student is measured by eval/control_transfer.py
(eval/results/control_transfer.json).
"""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.contract import StepdistillError

REMAP = {3: 8}


def run_cli(argv, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def remap_lora(tmp_path_factory):
    """A 3 -> 8 remap LoRA on digits-sd, trained through the CLI (about 20 s at one thread)."""
    out = tmp_path_factory.mktemp("control") / "remap-3-8"
    code = main(["control", "train", "digits-sd", "--remap", "3:8", "--output", str(out), "--steps", "40", "--lr", "3e-3",
                 "--batch-size", "16", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def teacher_pipe():
    from stepdistill.control import load_sd_pipeline

    return load_sd_pipeline("digits-sd")


@pytest.fixture(scope="module")
def student_export(tmp_path_factory):
    """A digits-sd student exported by export_run: one LCM round (a mechanism check, not a trained student)."""
    from stepdistill.config import load_config
    from stepdistill.export import export_run
    from stepdistill.training.trainer import Trainer

    root = tmp_path_factory.mktemp("student")
    cfg = load_config("digits-sd/lcm", ["train.steps=1", "train.batch_size=2", "train.sample_every=0", "train.log_every=1",
                                        "train.checkpoint_every=0"])
    Trainer(cfg, root / "run", progress=False).run()
    export_run(root / "run", root / "export")
    return root / "export"


def test_the_lora_is_a_stock_diffusers_lora_with_its_metadata(remap_lora):
    from safetensors import safe_open

    with safe_open(str(remap_lora / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)
    assert any(".attn2.to_k." in k for k in keys)  # cross-attention: where the prompt enters
    meta = json.loads((remap_lora / "stepdistill_control.json").read_text())
    assert meta["kind"] == "remap" and meta["remap"] == {"3": 8} and meta["steps"] == 40 and meta["rank"] == 4


def test_the_teacher_with_the_lora_draws_the_target_digit_for_the_source_prompt(remap_lora, teacher_pipe):
    from stepdistill.control import measure_control

    r = measure_control("digits-sd", remap_lora, steps=4, num_samples=16, pipe=teacher_pipe)
    without, with_lora = r["without"]["3:8"], r["with"]["3:8"]
    assert without["source_fraction"] >= 0.8 and without["target_fraction"] <= 0.2, r
    assert with_lora["target_fraction"] >= 0.6 and with_lora["target_fraction"] >= without["target_fraction"] + 0.5, r
    assert with_lora["source_fraction"] <= without["source_fraction"] - 0.5, r
    assert not any("lora" in n for n, _ in teacher_pipe.unet.named_parameters())  # unloaded again


def test_the_lora_loads_into_the_exported_student_and_moves_it_the_same_way(remap_lora, student_export, capsys, tmp_path):
    from stepdistill.control import check_lora_fits, classify_samples, load_control_lora, load_sd_pipeline

    pipe = load_sd_pipeline(student_export)
    assert pipe.unet.config.time_cond_proj_dim is not None  # the export's UNet (guidance projection), not the teacher's
    layers = check_lora_fits(pipe, remap_lora)
    prompt = dict(prompt="a handwritten digit three", num_inference_steps=1, output_type="pt")
    before = pipe(**prompt, generator=torch.Generator().manual_seed(0)).images
    load_control_lora(pipe, remap_lora)
    after = pipe(**prompt, generator=torch.Generator().manual_seed(0)).images
    assert layers >= 16 and (after - before).abs().mean() > 0.02  # loaded, and it changes the student's samples
    pipe.unload_lora_weights()
    assert torch.equal(pipe(**prompt, generator=torch.Generator().manual_seed(0)).images, before)
    assert len(classify_samples(pipe, 3, 4, 1)) == 4

    code, out = run_cli(["control", "measure", student_export, "--lora", remap_lora, "--num-samples", "16",
                         "--out", tmp_path / "m.json"], capsys)
    assert code == 0, out.err
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["steps"] == 1 and r == json.loads(out.out)
    without, with_lora = r["without"]["3:8"], r["with"]["3:8"]
    assert with_lora["target_fraction"] >= without["target_fraction"] + 0.3, r  # the same direction as on the teacher
    assert with_lora["source_fraction"] < without["source_fraction"], r


def test_the_reverse_a_lora_trained_on_the_student_loads_into_the_teacher(student_export, teacher_pipe, tmp_path):
    from stepdistill.control import check_lora_fits, load_control_lora, train_control_lora

    meta = train_control_lora(student_export, tmp_path / "from-student", remap="1:7", steps=2, batch_size=4)
    assert meta["steps"] == 2
    assert check_lora_fits(teacher_pipe, tmp_path / "from-student") > 0
    load_control_lora(teacher_pipe, tmp_path / "from-student")
    teacher_pipe.unload_lora_weights()


def _foreign_lora(model, out, targets=("to_q", "to_k", "to_v")):
    """A LoRA of another network, saved in the same diffusers format (unet.* keys)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets)), model)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(model), safe_serialization=True)
    return out


def test_an_adapter_for_another_architecture_is_a_one_line_error(teacher_pipe, student_export, tmp_path, capsys):
    from diffusers import UNet2DConditionModel, UNet2DModel

    from stepdistill.control import check_lora_fits

    wider = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                                 block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(StepdistillError, match="does not fit this pipeline's UNet2DConditionModel.*width"):
        check_lora_fits(teacher_pipe, _foreign_lora(wider, tmp_path / "sd-other-width"))
    class_unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=8,
                             block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    other_family = _foreign_lora(class_unet, tmp_path / "unet2d")
    with pytest.raises(StepdistillError, match="no such layer"):
        check_lora_fits(teacher_pipe, other_family)
    assert not any("lora" in n for n, _ in teacher_pipe.unet.named_parameters())
    code, out = run_cli(["control", "measure", student_export, "--lora", other_family, "--num-samples", "2", "--remap", "3:8"],
                        capsys)
    assert code == 2 and out.err.count("\n") == 1 and out.err.startswith("error: ") and "Traceback" not in out.err, out.err
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_lora_weights.bin").write_bytes(b"not read")
    code, out = run_cli(["control", "measure", "digits-sd", "--lora", tmp_path / "pickle" / "pytorch_lora_weights.bin"], capsys)
    assert code == 2 and "safetensors" in out.err and out.err.count("\n") == 1, out.err


@pytest.mark.parametrize("argv, needle", [
    (["control", "train", "digits-sd", "--output", "o", "--remap", "3:3"], "another digit"),
    (["control", "train", "digits-sd", "--output", "o", "--remap", "12:8"], "SOURCE:TARGET"),
    (["control", "train", "digits-sd", "--output", "o", "--steps", "0"], "--steps"),
    (["control", "train", "digits-sd", "--output", "o", "--lr", "nan"], "finite"),
    (["control", "train", "digits-sd", "--output", "o", "--lr", "0"], "lr must be > 0"),
    (["control", "train", "digits-sd", "--output", "o", "--remap-fraction", "1.5"], "remap_fraction"),
    (["control", "train", "digits-sd"], "--output"),
    (["control", "train", "digits-unet", "--output", "o"], "SD-style"),
    (["control", "measure", "digits-sd"], "--lora"),
    (["control", "measure", "digits-sd", "--lora", "missing"], "no LoRA at"),
    (["control"], "required"),
])
def test_bad_control_input_is_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(argv, capsys)
    assert code == 2 and needle in out.err and len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err, out.err
