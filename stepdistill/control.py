"""Control LoRAs that carry over between a teacher and its distilled student (issue 16, item 4).

A control LoRA is a small peft adapter on an SD-style teacher's UNet, trained with the teacher's
own denoising loss on a modified digits set, and saved in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``). An exported student keeps the teacher's UNet
architecture (``stepdistill export`` only adds a zero guidance projection), so the stock
``pipe.load_lora_weights(folder)`` loads the same file into either pipeline.

The one control kind shipped is ``remap``: the captions of digit ``a`` are paired with images
of digit ``b`` (``remap={a: b}``), while the other digits keep their own captions (and 10% the
empty prompt, the teacher's CFG branch). Its effect is measurable: the digits classifier tells
which digit a prompt for ``a`` produces.

    loss = || eps_hat(z_t, t, text_a) - eps ||^2,   z_t = alpha_t z0(b) + sigma_t eps    (epsilon teachers)

with the target ``v = alpha_t eps - sigma_t z0`` for v-prediction teachers, t uniform over the
teacher's training timesteps, noise added by the teacher's own scheduler.

The measure samples a pipeline with fixed seeds (sample i: seed + i, caption template i mod 8)
for the source prompt, with and without the LoRA, and reports the fraction classified as the
target digit and as the source digit.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import StepdistillError
from .validation import check_range

KINDS = ("remap",)
LORA_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "stepdistill_control.json"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections: cross-attention is where prompts enter
PROMPT_DROPOUT = 0.1  # as the digits-sd teacher: keeps the unconditional (CFG) branch trained
ADAPTER = "control"


# ------------------------------------------------------------------------------------- inputs


def parse_remap(text: str | dict) -> dict[int, int]:
    """``"3:8"`` or ``"3:8,1:7"`` (or a dict) -> {source digit: target digit}; one-line errors."""
    if isinstance(text, dict):
        pairs = [(str(a), str(b)) for a, b in text.items()]
    else:
        pairs = [p.split(":", 1) if ":" in p else (p, "") for p in str(text).replace(" ", "").split(",") if p]
    out: dict[int, int] = {}
    for a, b in pairs:
        if not (a.isdigit() and b.isdigit() and len(a) == 1 and len(b) == 1):
            raise StepdistillError(f"--remap takes SOURCE:TARGET digit pairs such as 3:8 or 3:8,1:7; got {text!r}")
        if a == b or int(a) in out:
            raise StepdistillError(f"--remap {text!r}: each source digit once, and mapped to another digit")
        out[int(a)] = int(b)
    if not out:
        raise StepdistillError("--remap is empty: give SOURCE:TARGET digit pairs such as 3:8")
    return out


def load_sd_pipeline(name_or_folder: str | Path, device: str = "cpu"):
    """A stock ``StableDiffusionPipeline`` from a teacher name, teacher folder or exported student folder."""
    from diffusers import StableDiffusionPipeline

    from .evaluation.sources import load_pipeline
    from .teachers import resolve_teacher_folder

    folder = resolve_teacher_folder(str(name_or_folder))
    if not (folder / "model_index.json").is_file():
        raise StepdistillError(f"{folder} has no model_index.json: control LoRAs need a diffusers pipeline folder "
                               "(an SD-style teacher such as digits-sd, or its exported student)")
    from transformers.utils import logging as tlog

    from .adapters.families.text import quiet_diffusers

    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        with quiet_diffusers():
            pipe = load_pipeline(folder, device)
    finally:
        if bars:
            tlog.enable_progress_bar()
    if not isinstance(pipe, StableDiffusionPipeline):
        raise StepdistillError(f"{folder} is a {type(pipe).__name__}: control LoRAs need a StableDiffusionPipeline "
                               "(a text-to-image UNet2DConditionModel teacher such as digits-sd, or its exported student)")
    return pipe


def _digits_pipeline(pipe) -> None:
    """One-line error unless the pipeline draws digit-sized images (the classifier's 16x16 gray)."""
    size = int(pipe.vae.config.sample_size)
    if pipe.vae.config.in_channels not in (1, 3) or size > 64:
        raise StepdistillError(f"this pipeline makes {size}x{size} images; digit control LoRAs are for digits teachers "
                               "(digits-sd and its students)")


# --------------------------------------------------------------------------------------- data


@dataclass
class DigitsLatents:
    """The digits train split as VAE posteriors, and every caption's prompt embeddings."""

    mean: Tensor  # [N, C, h, w] posterior means (unscaled)
    std: Tensor  # [N, C, h, w] posterior stds
    labels: Tensor  # [N] digit labels (CPU: batches are drawn there)
    captions: Tensor  # [10, T, L, D] prompt embeddings, digit x template
    null: Tensor  # [L, D] the empty prompt
    scale: float  # the VAE scaling factor


@torch.no_grad()
def digits_latents(pipe, device: str = "cpu") -> DigitsLatents:
    """Encode the digits train split with the pipeline's VAE and the captions with its ``encode_prompt``."""
    from .training.data.digits import CAPTION_TEMPLATES, all_captions, load_digits_images

    x, labels = load_digits_images("train", pipe.vae.config.sample_size)  # [N, 1, R, R]
    x = x.repeat(1, pipe.vae.config.in_channels, 1, 1).to(device)  # [N, 3, R, R]
    dist = pipe.vae.encode(x).latent_dist
    texts = [c for d in range(10) for c in all_captions(d)] + [""]
    emb = pipe.encode_prompt(texts, device, 1, False)[0]  # [10 * T + 1, L, D]: as the stock pipeline's call
    captions = emb[:-1].reshape(10, len(CAPTION_TEMPLATES), *emb.shape[1:])  # [10, T, L, D]
    return DigitsLatents(dist.mean, dist.std, labels, captions, emb[-1], float(pipe.vae.config.scaling_factor))


def remap_batch(data: DigitsLatents, remap: dict[int, int], batch_size: int, remap_fraction: float,
                g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(scaled latents z0 [B, C, h, w], prompt embeddings [B, L, D]) of a remapped digits batch.

    A ``remap_fraction`` of the batch pairs a source digit's caption with a target digit's image;
    the rest are images of the other digits with their own captions (10% the empty prompt).
    """
    n_remap = int(round(batch_size * remap_fraction))
    sources = torch.tensor(list(remap))[torch.randint(0, len(remap), (n_remap,), generator=g)]  # [R]
    targets = torch.tensor([remap[int(s)] for s in sources], dtype=torch.long)  # [R]
    keep = torch.nonzero(~torch.isin(data.labels, torch.tensor(list(remap)))).flatten()  # images of unmapped digits
    idx = torch.cat([_images_of(data.labels, targets, g), keep[torch.randint(0, len(keep), (batch_size - n_remap,), generator=g)]])
    words = torch.cat([sources, data.labels[idx[n_remap:]]])  # [B] the digit each caption names
    text = data.captions[words, torch.randint(0, data.captions.shape[1], (batch_size,), generator=g)]  # [B, L, D]
    drop = torch.rand(batch_size, generator=g) < PROMPT_DROPOUT
    drop[:n_remap] = False  # a remapped pair keeps its caption: the empty prompt stays the teacher's
    text = torch.where(drop[:, None, None].to(text.device), data.null.expand_as(text), text)
    eps = torch.randn(data.mean[idx].shape, generator=g).to(data.mean.device)  # [B, C, h, w]
    return data.scale * (data.mean[idx] + data.std[idx] * eps), text  # [B, C, h, w], [B, L, D]


def _images_of(labels: Tensor, digits: Tensor, g: torch.Generator) -> Tensor:
    """One random image index per requested digit [R]."""
    out = [torch.nonzero(labels == d).flatten() for d in digits.tolist()]
    return torch.tensor([o[int(torch.randint(0, len(o), (1,), generator=g))] for o in out], dtype=torch.long)


# ----------------------------------------------------------------------------------- training


def denoising_loss(unet, sched, z0: Tensor, text: Tensor, g: torch.Generator) -> Tensor:
    """The teacher's own DSM loss: its scheduler's ``add_noise`` and prediction target."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=g).to(z0.device)  # [B]
    eps = torch.randn(z0.shape, generator=g).to(z0.device)  # [B, C, h, w]
    z_t = sched.add_noise(z0, eps, t)
    kind = sched.config.prediction_type
    target = eps if kind == "epsilon" else sched.get_velocity(z0, eps, t) if kind == "v_prediction" else None
    if target is None:
        raise StepdistillError(f"control LoRAs train epsilon or v-prediction teachers; this one predicts {kind!r}")
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=text).sample.float(), target.float())


def train_control_lora(teacher: str | Path, output_dir: str | Path, kind: str = "remap", remap: dict[int, int] | str = "3:8",
                       steps: int = 300, rank: int = 4, lr: float = 1e-3, batch_size: int = 16,
                       remap_fraction: float = 0.5, seed: int = 0, device: str = "cpu", log_every: int = 0) -> dict:
    """Train a control LoRA on an SD-style pipeline's UNet and save it for ``load_lora_weights``.

    Args:
        teacher: an embedded teacher name (``digits-sd``), a teacher folder, or an exported student folder.
        output_dir: where ``pytorch_lora_weights.safetensors`` and ``stepdistill_control.json`` go (new or empty).
        kind: the control: ``remap`` (the source digits' captions draw the target digits).
        remap: {source digit: target digit}, or its text form ``"3:8,1:7"``.
        steps, rank, lr, batch_size: AdamW steps, LoRA rank (alpha = rank), learning rate, batch size.
        remap_fraction: share of each batch that is remapped pairs (the rest keeps the other digits as they are).
        seed: LoRA init, data order and noise.

    Returns:
        The metadata written to ``stepdistill_control.json`` (with ``lora_file``).
    """
    if kind not in KINDS:
        raise StepdistillError(f"unknown control kind {kind!r}; available: {', '.join(KINDS)}")
    for name, value in (("steps", steps), ("rank", rank), ("batch_size", batch_size)):
        check_range(name, value, 1)
    check_range("lr", lr, 0, 1)
    check_range("remap_fraction", remap_fraction, 0, 1)
    if lr == 0 or remap_fraction == 0:
        raise StepdistillError(f"{'lr' if lr == 0 else 'remap_fraction'} must be > 0")
    remap, out = parse_remap(remap), _empty_output(output_dir)
    pipe = load_sd_pipeline(teacher, device)
    _digits_pipeline(pipe)
    data = digits_latents(pipe, device)
    unet, start = _with_lora(pipe.unet, rank, seed), time.time()
    losses = _fit(unet, pipe.scheduler, data, remap, steps, lr, batch_size, remap_fraction, seed, log_every)
    meta = {"kind": kind, "remap": {str(a): b for a, b in remap.items()}, "teacher": str(teacher), "steps": steps,
            "rank": rank, "lora_alpha": rank, "lr": lr, "batch_size": batch_size, "remap_fraction": remap_fraction,
            "seed": seed, "target_modules": list(TARGETS), "seconds": round(time.time() - start, 1),
            "loss_first": round(sum(losses[:10]) / max(1, len(losses[:10])), 5),
            "loss_last": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 5), "unet_class": type(unet).__name__}
    meta["lora_file"] = save_control_lora(unet, out, rank)
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _empty_output(output_dir) -> Path:
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StepdistillError(f"{out} exists and is not an empty folder; choose another --output")
    return out


def _with_lora(unet, rank: int, seed: int):
    """The UNet frozen, with a fresh trainable LoRA (seeded init) on the attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    return unet


def _fit(unet, scheduler, data, remap, steps, lr, batch_size, remap_fraction, seed, log_every) -> list[float]:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)  # the training schedule (an export's LCMScheduler has the same betas)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g, losses = torch.Generator().manual_seed(seed), []
    for step in range(steps):
        z0, text = remap_batch(data, remap, batch_size, remap_fraction, g)
        loss = denoising_loss(unet, sched, z0, text, g)
        if not torch.isfinite(loss):
            raise StepdistillError(f"control LoRA training: the loss is {loss.item()} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"control step {step + 1}/{steps} loss={sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    unet.eval()
    return losses


def save_control_lora(unet, out: Path, rank: int) -> str:
    """The UNet's adapter as ``out/pytorch_lora_weights.safetensors`` (diffusers format, with its config)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(TARGETS)}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=config,
                                              weight_name=LORA_FILE, safe_serialization=True)
    return str(out / LORA_FILE)


# -------------------------------------------------------------------------------- loading


_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up)(\.[\w-]+)?\.weight$")


def lora_file(lora: str | Path) -> Path:
    """The safetensors file of a LoRA folder (or the file itself); never a pickle."""
    path = Path(lora)
    path = path / LORA_FILE if path.is_dir() else path
    if not path.is_file():
        raise StepdistillError(f"no LoRA at {lora}: expected a folder with {LORA_FILE} (from `stepdistill control train` "
                               "or save_lora_weights) or a .safetensors file")
    if path.suffix != ".safetensors":
        raise StepdistillError(f"{path}: stepdistill loads safetensors LoRAs only (no pickles); save with safe_serialization=True")
    return path


def check_lora_fits(pipe, lora: str | Path) -> int:
    """The number of UNet layers the LoRA adapts; one-line error unless every one exists with its shapes.

    diffusers only warns about adapter keys that name no module (and fails deep inside peft on
    shape mismatches), so an adapter for another architecture would load as a silent no-op.
    """
    path = lora_file(lora)
    try:
        state, _ = pipe.lora_state_dict(str(path.parent), weight_name=path.name, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise StepdistillError(f"cannot read the LoRA {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    unet_keys = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_keys:
        raise StepdistillError(f"{path} adapts no UNet layer (no 'unet.' keys; found e.g. {next(iter(state), 'nothing')!r}): "
                               "not a LoRA for this pipeline's UNet")
    bad = [_misfit(pipe.unet, k, v.shape) for k, v in sorted(unet_keys.items())]
    bad = [b for b in bad if b]
    modules = {_SUFFIX.sub("", k) for k in unet_keys}
    if bad:
        raise StepdistillError(f"{path} does not fit this pipeline's {type(pipe.unet).__name__}: {len(bad)} of {len(unet_keys)} "
                               f"LoRA tensors do not match ({bad[0]}); it was trained for another architecture or family: "
                               "train one on this teacher (stepdistill control train)")
    return len(modules)


def _misfit(unet, key: str, shape) -> str | None:
    """Why one LoRA tensor does not fit the UNet (None when it does)."""
    m = _SUFFIX.search(key)
    if m is None:
        return f"{key}: not a LoRA weight"
    path = key[:m.start()]
    try:
        module = unet.get_submodule(path)
    except AttributeError:
        return f"{path}: no such layer"
    base = getattr(module, "base_layer", module)
    down = m.group(1) in ("lora_A", "lora.down")
    want = getattr(base, "in_features", getattr(base, "in_channels", None)) if down else \
        getattr(base, "out_features", getattr(base, "out_channels", None))
    got = shape[1] if down else shape[0]
    return None if want == got else f"{path}: {'input' if down else 'output'} width {got}, the layer has {want}"


def load_control_lora(pipe, lora: str | Path, adapter_name: str = ADAPTER):
    """``pipe.load_lora_weights`` after ``check_lora_fits``; one-line error if no layer took the adapter."""
    from peft.tuners.lora import LoraLayer

    expected = check_lora_fits(pipe, lora)
    path = lora_file(lora)
    from .adapters.families.text import quiet_diffusers

    with quiet_diffusers():  # diffusers' notes on text-encoder keys the file does not have
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    loaded = sum(1 for m in pipe.unet.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
    if loaded != expected:
        pipe.unload_lora_weights()
        raise StepdistillError(f"{path}: {loaded} of the {expected} adapted UNet layers took the LoRA; it does not fit this pipeline")
    return pipe


# -------------------------------------------------------------------------------- measuring


def lora_remap(lora: str | Path) -> dict[int, int] | None:
    """The remap a control LoRA was trained for (its ``stepdistill_control.json``), if known."""
    meta = lora_file(lora).parent / META_FILE
    if not meta.is_file():
        return None
    try:
        remap = json.loads(meta.read_text()).get("remap")
    except json.JSONDecodeError:
        return None
    return parse_remap({int(a): int(b) for a, b in remap.items()}) if remap else None


def sampling_defaults(pipe, folder: Path, steps: int | None, guidance_scale: float | None) -> tuple[int, float | None]:
    """(steps, guidance): an export's own step count; a teacher's DDPM swapped for DDIM at 20 steps, its recommended CFG."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from .evaluation.sources import export_meta

    meta = export_meta(folder)
    if meta.get("steps"):
        return steps or int(meta["steps"][0]), guidance_scale
    if isinstance(pipe.scheduler, DDPMScheduler):  # deterministic few-step sampling of the teacher
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    teacher_meta = folder / "stepdistill_teacher.json"
    recommended = json.loads(teacher_meta.read_text()).get("recommended_guidance_scale") if teacher_meta.is_file() else None
    return steps or 20, guidance_scale if guidance_scale is not None else recommended


@torch.no_grad()
def classify_samples(pipe, digit: int, num_samples: int, steps: int, guidance_scale: float | None = None, seed: int = 0,
                     batch_size: int = 64, lora_scale: float = 1.0, classifier=None) -> Tensor:
    """Predicted labels [N] of ``num_samples`` seeded samples (seed + i) for captions of ``digit``."""
    from .evaluation.digits_classifier import load_digits_classifier
    from .evaluation.seeding import sample_generators
    from .evaluation.sources import _images_to_tensor
    from .training.data.digits import all_captions

    classifier = classifier or load_digits_classifier()
    captions, labels = all_captions(digit), []
    for lo in range(0, num_samples, batch_size):
        ids = list(range(lo, min(num_samples, lo + batch_size)))
        kwargs = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
        out = pipe([captions[i % len(captions)] for i in ids], num_inference_steps=steps, output_type="pt",
                   generator=sample_generators([seed + i for i in ids]), cross_attention_kwargs={"scale": lora_scale}, **kwargs)
        gray = _images_to_tensor(out.images).mean(1, keepdim=True)  # [B, 1, H, W] in [-1, 1]
        if gray.shape[-1] != classifier.resolution:
            gray = F.interpolate(gray, size=(classifier.resolution,) * 2, mode="bilinear", antialias=True)
        labels.append(classifier.predict(gray))
    return torch.cat(labels)  # [N]


def remap_fractions(pipe, remap: dict[int, int], num_samples: int, steps: int, guidance_scale: float | None = None,
                    seed: int = 0, lora_scale: float = 1.0) -> dict:
    """Per source digit: the fraction of its prompt's samples classified as the target and as the source."""
    out = {}
    for a, b in remap.items():
        pred = classify_samples(pipe, a, num_samples, steps, guidance_scale, seed, lora_scale=lora_scale)
        out[f"{a}:{b}"] = {"target_fraction": (pred == b).float().mean().item(),
                           "source_fraction": (pred == a).float().mean().item(),
                           "counts": {str(d): int(n) for d, n in enumerate(torch.bincount(pred, minlength=10)) if n}}
    return out


def measure_control(pipeline: str | Path, lora: str | Path, remap: dict[int, int] | str | None = None, steps: int | None = None,
                    num_samples: int = 64, guidance_scale: float | None = None, seed: int = 0, lora_scale: float = 1.0,
                    device: str = "cpu", pipe=None) -> dict:
    """A pipeline's remapped-prompt samples without and with a control LoRA (the same seeds).

    Args:
        pipeline: a teacher name or folder (sampled with DDIM at ``steps``, default 20, and its recommended
            CFG) or an exported student folder (at its own step count).
        lora: the LoRA folder (``stepdistill control train --output``) or its .safetensors file.
        remap: {source: target}; default: the one the LoRA was trained for.
        pipe: an already loaded pipeline for ``pipeline`` (without adapters), to skip loading it again.

    Returns:
        {"without": {...}, "with": {...}} per ``"a:b"``: target_fraction, source_fraction, counts {digit: samples};
        plus the protocol (steps, guidance, samples, seed, lora_scale).
    """
    check_range("num_samples", num_samples, 1)
    check_range("lora_scale", lora_scale)
    remap = parse_remap(remap) if remap is not None else lora_remap(lora)
    if remap is None:
        raise StepdistillError(f"{lora} does not say which digits it remaps (no {META_FILE}): pass --remap SOURCE:TARGET")
    lora_file(lora)
    pipe = pipe or load_sd_pipeline(pipeline, device)
    _digits_pipeline(pipe)
    from .teachers import resolve_teacher_folder

    steps, guidance = sampling_defaults(pipe, resolve_teacher_folder(str(pipeline)), steps, guidance_scale)
    without = remap_fractions(pipe, remap, num_samples, steps, guidance, seed)
    load_control_lora(pipe, lora)
    try:
        with_lora = remap_fractions(pipe, remap, num_samples, steps, guidance, seed, lora_scale)
    finally:
        pipe.unload_lora_weights()
    return {"pipeline": str(pipeline), "lora": str(lora), "steps": steps, "guidance_scale": guidance,
            "num_samples": num_samples, "seed": seed, "lora_scale": lora_scale, "without": without, "with": with_lora}


__all__ = ["KINDS", "LORA_FILE", "check_lora_fits", "classify_samples", "load_control_lora", "load_sd_pipeline",
           "measure_control", "parse_remap", "remap_fractions", "train_control_lora"]
