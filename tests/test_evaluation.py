"""Evaluation harness: metric sanity, per-sample seeds, reference cache, CLIP plumbing, the eval CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stepdistill.contract import StepdistillError
from stepdistill.evaluation import metrics
from stepdistill.evaluation.features import DigitsFeatures, extract, quantize
from stepdistill.evaluation.seeding import make_conditions


@pytest.fixture(scope="module")
def digits():
    from stepdistill.training.data.digits import load_digits_images

    images, labels = load_digits_images("test")  # [360, 1, 16, 16]
    return images, labels


@pytest.fixture(scope="module")
def feature_net():
    return DigitsFeatures()


# ------------------------------------------------------------------------------------ metrics


def test_fid_self_zero_and_monotone_in_pixel_noise(digits, feature_net):
    images, _ = digits
    real = extract(feature_net, quantize(images))
    assert abs(metrics.fid(real, real)) < 1e-6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    fids = [metrics.fid(real, extract(feature_net, quantize(images + s * noise))) for s in (0.05, 0.2, 0.5, 1.0)]
    assert fids[0] > 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_layer_view_sees_grain_and_blur_the_penultimate_features_barely_see():
    """The artifact-sensitive view (issue 17 item 8): pixel noise of std 0.1 or a 3x3 blur on real digits
    moves its FID far above the real-vs-real floor, where the classifier's penultimate features move little."""
    from stepdistill.evaluation.features import DigitsLayerFeatures
    from stepdistill.training.data.digits import load_digits_images

    images = load_digits_images()[0]
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = images[perm[:800]], images[perm[800:1600]]
    noisy = b + 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1))
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(b, (1, 1, 1, 1), mode="replicate"), kernel[None, None])
    ratios = {}
    for name, net in (("penultimate", DigitsFeatures()), ("layers", DigitsLayerFeatures())):
        real = extract(net, quantize(a))
        floor = metrics.fid(real, extract(net, quantize(b)))
        ratios[name] = [metrics.fid(real, extract(net, quantize(x))) / floor for x in (noisy, blurred)]
    assert ratios["penultimate"][0] < 1.3 and ratios["layers"][0] > 1.7, ratios  # grain
    assert ratios["layers"][1] > 3 * ratios["penultimate"][1], ratios  # blur
    assert DigitsLayerFeatures().num_features == 2 * 32 + 2 * (32 + 64) + 128


def test_fid_through_torchmetrics_feature_module_matches_precomputed(digits, feature_net):
    images, _ = digits
    real_q = quantize(images[:200])
    fake_q = quantize(images[200:] + 0.3 * torch.randn(images[200:].shape, generator=torch.Generator().manual_seed(1)))
    direct = metrics.fid_from_images(feature_net, real_q, fake_q)
    cached = metrics.fid(extract(feature_net, real_q), extract(feature_net, fake_q))
    assert direct == pytest.approx(cached, rel=1e-6)
    assert direct > 1.0


def test_precision_recall_self_and_shifted():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    shifted = [metrics.precision_recall(x, x + s) for s in (0.3, 1.0, 3.0, 20.0)]
    precisions, recalls = zip(*shifted)
    assert all(a >= b for a, b in zip(precisions, precisions[1:])) and precisions[0] > precisions[-1]
    assert all(a >= b for a, b in zip(recalls, recalls[1:])) and recalls[0] > recalls[-1]
    assert precisions[-1] == 0.0 and recalls[-1] == 0.0  # disjoint sets


def test_precision_recall_detects_mode_dropping():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 10])
    one_mode = torch.randn(400, 4, generator=g)
    precision, recall = metrics.precision_recall(real, one_mode)
    assert precision > 0.9 and recall < 0.6


def test_kid_and_diversity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = torch.randn(300, 16, generator=g)
    assert abs(metrics.kid(x, y)[0]) < 0.05 < metrics.kid(x, y + 2)[0]
    collapsed = x[:1].repeat(300, 1) + 0.01 * y
    assert metrics.vendi_score(collapsed) < 2 < metrics.vendi_score(x)
    assert metrics.mean_pairwise_distance(collapsed) < metrics.mean_pairwise_distance(x)


# ------------------------------------------------------------------------------------ seeds


def test_conditions_balanced_seeded_and_prefix_stable():
    c = make_conditions(100, 5, num_classes=10)
    assert torch.bincount(c.labels, minlength=10).tolist() == [10] * 10
    assert torch.equal(make_conditions(30, 5, num_classes=10).labels, c.labels[:30])
    assert not torch.equal(make_conditions(100, 6, num_classes=10).labels, c.labels)
    p = make_conditions(20, 0, prompts="digits")
    from stepdistill.training.data.digits import DIGIT_WORDS

    assert all(DIGIT_WORDS[int(y)] in text or str(int(y)) in text for y, text in zip(p.labels, p.prompts))


def test_teacher_samples_do_not_depend_on_batch_size(unet_teacher_dir):
    from stepdistill.evaluation.harness import generate_samples
    from stepdistill.evaluation.sources import teacher_sampler
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(unet_teacher_dir))
    for solver in ("ddim", "dpm++"):
        sampler = teacher_sampler(teacher, solver, 3, guidance_scale=2.0)
        conds = make_conditions(14, 7, sampler.num_classes)
        a = generate_samples(sampler, conds, 14, 7, batch_size=3)
        b = generate_samples(sampler, conds, 14, 7, batch_size=7)
        assert torch.allclose(a, b, atol=1e-5), (solver, (a - b).abs().max())
        assert not torch.allclose(a[0], a[1])


def test_harness_ddim_on_a_clipping_teacher_follows_the_pf_ode_at_many_steps():
    """Issue 17 item 6: the benchmark's DDIM got worse with more steps on digits-unet (FID 1.1 at 16, 6.2 at 50):
    diffusers' DDIM paired the raw eps with the clipped x0. It now follows sampling.ddim_sample (eps recomputed
    from the clipped x0) at 50 steps; before the fix the mean difference was 0.125 on 8 samples."""
    from stepdistill.evaluation.sources import cond_dicts, per_sample_randn, sample_generators, teacher_sampler
    from stepdistill.sampling import ddim_sample
    from stepdistill.teachers import load_teacher

    teacher = load_teacher("digits-unet")
    assert json.loads((teacher.folder / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    seeds, conds = [0, 1, 2, 3], make_conditions(4, 0, 10)
    sampler = teacher_sampler(teacher, "ddim", 50, 2.0)
    assert sampler.info["step_kwargs"] == {"use_clipped_model_output": True}
    harness = sampler.generate(seeds, conds)
    cond, null = cond_dicts(teacher.conditioner, conds, "cpu")
    with torch.no_grad():
        ode = ddim_sample(teacher.denoiser, per_sample_randn(sample_generators(seeds), teacher.sample_shape), cond, 50, null, 2.0)
    assert (harness - ode.clamp(-1, 1)).abs().mean() < 0.01


def test_seeded_few_step_sample_matches_few_step_sample_per_row(unet_teacher_dir):
    from stepdistill.evaluation.seeding import per_sample_randn, sample_generators
    from stepdistill.evaluation.sources import seeded_few_step_sample
    from stepdistill.sampling import few_step_sample
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(unet_teacher_dir))
    times, seeds, labels = [1.0, 0.6, 0.3], [11, 12, 13], torch.tensor([1, 2, 3])
    gens = sample_generators(seeds)
    noise = per_sample_randn(gens, teacher.sample_shape)
    with torch.no_grad():
        batched = seeded_few_step_sample(teacher.denoiser, noise, {"class_labels": labels}, times, gens)
        for b, s in enumerate(seeds):
            g = torch.Generator().manual_seed(s)
            z = torch.randn(teacher.sample_shape, generator=g)[None]
            row = few_step_sample(teacher.denoiser, z, {"class_labels": labels[b:b + 1]}, times, g)
            assert torch.allclose(batched[b:b + 1], row, rtol=1e-4, atol=1e-4)  # the random net's x0 is ~1e2


# ------------------------------------------------------------------------------------ cache


class _FakeFeatures(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.num_features = scale, 4
        self.protocol = {"feature_network": "test", "feature_sha256": f"scale{scale}", "num_features": 4}
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return images.float().flatten(1)[:, :4] * self.scale


def test_reference_cache_hit_and_miss_by_protocol(tmp_path):
    from stepdistill.evaluation.reference import reference_features

    net = _FakeFeatures(1.0)
    first = reference_features("digits-test", net, tmp_path, log=lambda _m: None)
    calls = net.calls
    second = reference_features("digits-test", net, tmp_path, log=lambda _m: None)
    assert not first.cache_hit and second.cache_hit and net.calls == calls
    assert torch.equal(first.features, second.features) and len(first.features) == 360
    other = reference_features("digits-test", _FakeFeatures(2.0), tmp_path, log=lambda _m: None)
    assert not other.cache_hit and other.key != first.key
    assert torch.allclose(other.features, 2 * first.features)
    train = reference_features("digits-train", net, tmp_path, log=lambda _m: None)
    assert not train.cache_hit and train.key != first.key
    assert sorted(p.suffix for p in tmp_path.iterdir()).count(".json") == 3
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


# ------------------------------------------------------------------------------------ CLIP


def _tiny_open_clip(folder):
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


def test_clip_score_plumbing_with_tiny_random_open_clip(tmp_path):
    from stepdistill.evaluation.clip import ClipScorer

    reference_model = _tiny_open_clip(tmp_path / "clip")
    scorer = ClipScorer(tmp_path / "clip")
    for k, v in reference_model.state_dict().items():  # the saved weights were loaded, not a fresh init
        assert torch.equal(scorer.model.state_dict()[k], v), k
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a handwritten digit seven", "the digit 3"] * 3
    cos = scorer.cosine(images, prompts)
    assert cos.shape == (6,) and bool(((cos >= -1) & (cos <= 1)).all())
    assert not torch.allclose(cos, scorer.cosine(images, prompts[::-1]))
    out = scorer.score(images, prompts)
    assert out["clip_cosine"] == pytest.approx(float(cos.mean()))
    assert out["clip_score"] == pytest.approx(float((100 * cos).clamp_min(0).mean()))
    with pytest.raises(StepdistillError):
        scorer.cosine(images, prompts[:2])


# ------------------------------------------------------------------------------------ CLI


def test_eval_cli_end_to_end_on_tiny_teacher(unet_teacher_dir, tmp_path, capsys):
    from stepdistill.cli import main

    out = tmp_path / "out"
    rc = main(["eval", str(unet_teacher_dir), "--steps", "1", "2", "--solvers", "ddim", "--guidance-scale", "2",
               "--num-samples", "20", "--batch-size", "8", "--cost-batch-size", "4", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in records] == [1, 2]
    for r in records:
        for key in ("fid", "fid_layers", "recall_layers", "kid", "precision", "recall", "accuracy", "vendi", "latency_s",
                    "throughput_img_s"):
            assert math.isfinite(r[key]), key
        assert r["nfe"] == 2 * r["steps"]  # CFG: conditional + unconditional row per step
        assert r["peak_memory_bytes"] > 0
        assert r["protocol"]["num_samples"] == 20 and len(r["protocol"]["feature_sha256"]) == 64
        assert (out / "grids").joinpath(r["sample_grid"].split("/")[-1]).is_file()
    report = (out / "report.md").read_text()
    assert "| model | NFE | FID" in report and "feature sha256" in report


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    from stepdistill.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["eval", "digits-unet", "--num-samples", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--num-samples" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ sources


def test_run_dir_student_matches_trained_student(unet_teacher_dir, tmp_path):
    from stepdistill.config import load_config
    from stepdistill.evaluation.seeding import Conditions, per_sample_randn, sample_generators
    from stepdistill.evaluation.sources import ModelSampler, model_kind, seeded_few_step_sample, student_sampler
    from stepdistill.training.networks import Net
    from stepdistill.training.trainer import Trainer

    cfg = load_config(None, [f"teacher.name={unet_teacher_dir}", "objective.name=dmd", "train.steps=2", "train.batch_size=4",
                             "train.sample_every=0", "train.num_sample_images=4", "train.cpu=true", "train.log_every=1",
                             "student.times=[1.0,0.5]", "student.lr=0.01"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    assert model_kind(str(tmp_path / "run")) == "student"
    sampler = student_sampler(tmp_path / "run")
    assert sampler.steps == 2 and sampler.kind == "student"
    w = cfg.objective.guidance_scale  # the label says which teacher CFG the student was distilled toward
    assert sampler.info["distilled_guidance_scale"] == w
    assert (f", distilled w={w:g}" in sampler.label) == (w != 1.0)
    assert ModelSampler("r", "student", "few-step", 1, None, None, [], info={"distilled_guidance_scale": 2.0}).label \
        == "r [student] few-step 1 step, distilled w=2"
    seeds, labels = [3, 4, 5], torch.tensor([0, 5, 9])
    got = sampler.generate(seeds, Conditions(labels, None))
    tr = trainer.trainables["student"]
    view = Net(tr.module, trainer.teacher.denoiser.schedule, adapter=tr.adapter)
    gens = sample_generators(seeds)
    with torch.no_grad():
        want = seeded_few_step_sample(view, per_sample_randn(gens, trainer.teacher.sample_shape),
                                      {"class_labels": labels}, [1.0, 0.5], gens).clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-5)


def test_pipeline_folder_source_seeds_and_nfe(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline

    from stepdistill.evaluation.cost import NFECounter
    from stepdistill.evaluation.harness import generate_samples
    from stepdistill.evaluation.seeding import Conditions
    from stepdistill.evaluation.sources import model_kind, pipeline_sampler

    from conftest import tiny_unet2d

    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    assert model_kind(str(tmp_path / "pipe")) == "pipeline"
    sampler = pipeline_sampler(tmp_path / "pipe", steps=2)
    with NFECounter(sampler.networks) as counter:
        a = generate_samples(sampler, Conditions(), 6, 0, batch_size=2)
    b = generate_samples(sampler, Conditions(), 6, 0, batch_size=6)
    assert a.shape == (6, 1, 8, 8) and torch.allclose(a, b, atol=1e-5)
    assert counter.rows / 6 == 2


def test_flow_teacher_with_flow_euler(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from conftest import tiny_dit
    from stepdistill.evaluation.cost import NFECounter
    from stepdistill.evaluation.harness import generate_samples
    from stepdistill.evaluation.sources import teacher_sampler
    from stepdistill.teachers import load_teacher

    torch.manual_seed(0)
    folder = tmp_path / "flow"
    tiny_dit().save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    (folder / "stepdistill_teacher.json").write_text(json.dumps({"num_classes": 10, "null_class": None}))
    teacher = load_teacher(str(folder))
    with pytest.raises(StepdistillError, match="flow-euler"):
        teacher_sampler(teacher, "ddim", 2, 1.0)
    sampler = teacher_sampler(teacher, "flow-euler", 3, 1.0)
    conds = make_conditions(5, 0, 10)
    with NFECounter(sampler.networks) as counter:
        a = generate_samples(sampler, conds, 5, 0, batch_size=2)
    assert counter.rows / 5 == 3 and a.shape == (5, 4, 8, 8)
    assert torch.allclose(a, generate_samples(sampler, conds, 5, 0, batch_size=5), atol=1e-5)


def test_latent_text_teacher_with_prompts_and_vae(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from stepdistill.evaluation.harness import generate_samples
    from stepdistill.evaluation.sources import teacher_sampler
    from stepdistill.teachers import load_teacher

    torch.manual_seed(0)
    folder = tmp_path / "sd"
    UNet2DConditionModel(block_out_channels=(4, 8), norm_num_groups=4, layers_per_block=1, sample_size=4, in_channels=4,
                         out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
                         attention_head_dim=2).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4).save_pretrained(folder / "vae")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    from conftest import minilm_text_side

    minilm_text_side(folder, {"recommended_guidance_scale": 3.0})
    sampler = teacher_sampler(load_teacher(str(folder)), "dpm++", 2)
    assert sampler.prompts == "digits" and sampler.guidance_scale == 3.0
    conds = make_conditions(4, 0, prompts="digits")
    a = generate_samples(sampler, conds, 4, 0, batch_size=3)
    assert a.shape == (4, 3, 4, 4) and bool(torch.isfinite(a).all())
    assert torch.allclose(a, generate_samples(sampler, conds, 4, 0, batch_size=4), atol=1e-5)


# ------------------------------------------------------------------------------------ Inception path


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception-v3 weights file written here (nothing downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    mp = pytest.MonkeyPatch()
    mp.setattr(tfi.torch, "load", lambda *a, **k: {})  # build the network without any weights file
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    finally:
        mp.undo()
    for m in net.modules():  # variance-preserving init, so features do not vanish through ~90 layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


def test_inception_features_from_a_local_file(random_inception_file, digits):
    from stepdistill.evaluation.features import InceptionFeatures

    images, _ = digits
    net = InceptionFeatures(random_inception_file)
    feats = extract(net, quantize(images[:24]))
    assert feats.shape == (24, 2048) and torch.isfinite(feats).all() and feats.std(0).max() > 0
    assert net.protocol["feature_sha256"] == net.sha256 and "299x299" in net.protocol["resize"]
    self_fid = abs(metrics.fid(feats, feats))  # 24 samples in 2048-d: rank-deficient, so sqrtm round-off ~1e-5
    assert self_fid < 1e-3
    noisy = extract(net, quantize(images[:24] + 0.8 * torch.randn(images[:24].shape, generator=torch.Generator().manual_seed(1))))
    assert metrics.fid(feats, noisy) > 1000 * max(self_fid, 1e-6)
    tf = InceptionFeatures(random_inception_file, antialias=False)  # the TF1-compatible resize differs
    assert not torch.equal(extract(tf, quantize(images[:4])), feats[:4])


def test_inception_file_is_never_unpickled(tmp_path):
    from stepdistill.evaluation.features import InceptionFeatures

    bad = tmp_path / "not-weights.pth"
    torch.save({"payload": StepdistillError("an arbitrary object")}, bad)
    with pytest.raises(StepdistillError, match="refusing to unpickle"):
        InceptionFeatures(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(StepdistillError, match="does not fit"):
        InceptionFeatures(wrong)
    with pytest.raises(StepdistillError, match="is not a file"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_eval_cli_with_inception_weights(random_inception_file, unet_teacher_dir, digits, tmp_path):
    from PIL import Image

    from stepdistill.cli import main

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(quantize(digits[0][:16])):
        Image.fromarray(img[0].numpy()).save(ref / f"{i:02d}.png")
    out = tmp_path / "out"
    rc = main(["eval", str(unet_teacher_dir), "--steps", "1", "--solvers", "ddim", "--num-samples", "12",
               "--batch-size", "12", "--cost-batch-size", "4", "--reference", str(ref), "--inception-weights",
               str(random_inception_file), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert rc == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert "Inception-v3" in record["protocol"]["feature_network"] and math.isfinite(record["fid"])
    assert record["protocol"]["reference"] == str(ref) and record["protocol"]["reference_count"] == 16


def test_speedup_and_training_time_columns(tmp_path):
    from stepdistill.evaluation.report import add_speedups, table
    from stepdistill.training.trainer import training_summary

    recs = [{"label": "T ddim 50", "kind": "teacher", "model": "t", "teacher": "t", "solver": "ddim", "steps": 50, "latency_s": 2.0},
            {"label": "T dpm 50", "kind": "teacher", "model": "t", "teacher": "t", "solver": "dpm++", "steps": 50, "latency_s": 1.0},
            {"label": "S 1", "kind": "student", "model": "runs/s", "info": {"teacher": "t"}, "steps": 1, "latency_s": 0.025,
             "train_seconds": 90.0},
            {"label": "P 1", "kind": "pipeline", "model": "p", "teacher": "other", "steps": 1, "latency_s": 0.01}]
    add_speedups(recs)
    assert recs[2]["speedup_vs_teacher_50"] == pytest.approx(40.0)  # against DPM-Solver++, the best 50-step solver
    assert "speedup_vs_teacher_50" not in recs[3] and "speedup_vs_teacher_50" not in recs[0]
    rows = table(recs)
    assert "speed-up vs T50" in rows[0] and "train min" in rows[0] and "| 40.0x | 1.5 |" in rows[4]
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        ['{"step": 25, "elapsed_s": 10.0}', '{"step": 50, "elapsed_s": 20.5}',  # killed here, resumed:
         '{"step": 75, "elapsed_s": 9.5}', '{"step": 100, "elaps']))  # last line cut by a kill
    assert training_summary(tmp_path) == {"rounds": 75, "seconds": 30.0}
    assert training_summary(tmp_path, upto=60) == {"rounds": 50, "seconds": 20.5}  # a checkpoint's step: its time so far
    assert training_summary(tmp_path, upto=10) is None and training_summary(tmp_path / "nowhere") is None
