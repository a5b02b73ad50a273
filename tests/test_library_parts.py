"""Library parts where users expect them: accelerate trackers, diffusers LR schedules, ModelCard, --push-to-hub."""

import json
import types

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import NetworkConfig, load_config
from stepdistill.contract import StepdistillError
from stepdistill.training.optim import make_optimizer as _optimizer
from stepdistill.training.trainer import Trainer

FAST = ["train.steps=2", "train.log_every=1", "train.sample_every=0", "train.batch_size=8", "train.num_sample_images=4",
        "student.fit_steps=5", "student.mlp_hidden=16", "fake_score.mlp_hidden=16", "objective.critic_ratio=1"]


def lrs(schedule: str, warmup: int, total: int = 10) -> list[float]:
    cfg = NetworkConfig(lr=1.0, lr_schedule=schedule, warmup_steps=warmup)
    opt, sched = _optimizer(types.SimpleNamespace(name="student", cfg=cfg, params=[torch.nn.Parameter(torch.zeros(1))]), total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_are_diffusers_get_scheduler():
    import math

    assert lrs("constant", 0) == [1.0] * 10
    assert lrs("constant", 4)[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # constant_with_warmup: linear from 0
    cos = lrs("cosine", 2)
    assert cos[:2] == [0.0, 0.5] and cos[2] == 1.0
    assert cos[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # half-cosine over the updates after warm-up
    assert lrs("linear", 0)[5] == pytest.approx(0.5)
    with pytest.raises(StepdistillError, match="lr_schedule must be one of constant, cosine"):
        NetworkConfig(lr_schedule="exp")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lib") / "run"
    Trainer(load_config("toy2d/dmd", FAST), run, progress=False).run()
    return run


def test_tensorboard_tracker_writes_the_run_folder(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((toy_run / "tensorboard").iterdir())
    assert files and all(f.is_file() and f.name.startswith("events.out.tfevents") for f in files)  # no hparams folder
    acc = EventAccumulator(str(toy_run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("student/loss")] == [1, 2]
    logged = {json.loads(line)["step"]: json.loads(line)["student/loss"] for line in (toy_run / "metrics.jsonl").read_text().splitlines()}
    assert acc.Scalars("student/loss")[1].value == pytest.approx(logged[2], abs=1e-5)


def test_report_to_none_and_a_missing_tracker_package(tmp_path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    Trainer(load_config("toy2d/dmd", FAST + ["train.steps=1", "train.report_to=none"]), tmp_path / "quiet", progress=False).run()
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {str(t.value) for t in get_available_trackers()})[0]
    with pytest.raises(StepdistillError, match=f"train.report_to={missing} needs the {missing} package: pip install {missing}") as e:
        Trainer(load_config("toy2d/dmd", FAST + [f"train.report_to=tensorboard,{missing}"]), tmp_path / "m", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(StepdistillError, match="unknown tracker 'tensorbored'"):
        Trainer(load_config("toy2d/dmd", FAST + ["train.report_to=tensorbored"]), tmp_path / "u", progress=False)


def test_model_card_is_a_huggingface_hub_model_card(tmp_path):
    from huggingface_hub import ModelCard

    from stepdistill.export import model_card

    meta = {"teacher": "digits-sd", "objective": "dmd2", "steps": [1], "student_times": {"1": [1.0]},
            "pipeline": "StableDiffusionPipeline", "scheduler": "LCMScheduler", "rounds": 3, "batch_size": 4, "ema": False,
            "teacher_guidance_scale": 2.0, "dtype": "fp32", "num_classes": None, "text_encoder_in_folder": True}
    model_card(meta, tmp_path).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "dmd2" in card.data.tags and "| objective | `dmd2` |" in card.text
    assert card.text.startswith("# One-step student of `digits-sd`")


def test_push_to_hub_fails_in_one_line_before_writing(tmp_path, toy_run, monkeypatch, capsys):
    import huggingface_hub

    out = tmp_path / "export"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["export", str(toy_run), str(out), "--push-to-hub", "me/student"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face token" in err[0] and not out.exists()

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here, and never a real request
    assert main(["export", str(toy_run), str(out), "--push-to-hub", "me/student"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Hugging Face Hub" in err[0] and not out.exists()


def test_failed_upload_names_the_complete_local_export(tmp_path, monkeypatch):
    import huggingface_hub

    from stepdistill.export import push_to_hub

    (tmp_path / "README.md").write_text("# card\n")

    def refuse(self, *a, **k):
        raise ConnectionError("no route to host\nsecond line")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(StepdistillError, match="upload failed .*ConnectionError: no route to host.* is complete") as e:
        push_to_hub(tmp_path, "me/student", "hf_x")
    assert "\n" not in str(e.value) and (tmp_path / "README.md").read_text() == "# card\n"
