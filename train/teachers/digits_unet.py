"""Train the embedded class-conditional DDPM teacher -> assets/teachers/digits-unet/.

    python train/teachers/digits_unet.py --out assets/teachers/digits-unet

- ``unet/``: diffusers UNet2DModel, 1x16x16 pixels in [-1, 1], epsilon prediction, classes
  via ``num_class_embeds=11``: labels 0-9 plus index 10, the null class for classifier-free
  guidance (10% of training labels are replaced by 10).
- ``scheduler/``: DDPMScheduler, 1000 steps, ``beta_schedule="squaredcos_cap_v2"``.

Why the cosine ("squaredcos_cap_v2") betas: at 16x16 with digits that are really 8x8, the
linear DDPM schedule destroys the signal early (alpha_bar drops below 0.01 by t ~ 600), so a
large share of the 1000 timesteps is spent near pure noise; the cosine schedule (Nichol &
Dhariwal 2021, arXiv:2102.09672) spreads the log-SNR evenly, which gives a better teacher for
few-step samplers and for distillation, which query the teacher at all noise levels.

Data: the train split of scikit-learn's digits (1437 images, stratified split seed 0), no
augmentation. Training: AdamW, warmup + cosine LR, EMA of the weights; at the end the raw and
EMA weights are compared by 50-step DDIM samples (digits-classifier accuracy and FID) and the
better one is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

import common
import sample_teacher as st
from stepdistill.training.data.digits import load_digits_images
from stepdistill.evaluation.digits_classifier import load_digits_classifier

NUM_CLASSES, NULL_CLASS, LABEL_DROPOUT = 10, 10, 0.1
EMA_DECAY = 0.999
EVAL_GUIDANCE, EVAL_SAMPLES = 2.0, 300


def build_unet() -> UNet2DModel:
    """~1.1M parameters; attention at the 8x8 level only."""
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 64, 64), attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def drop_labels(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Replace LABEL_DROPOUT of the labels by the null class."""
    return torch.where(torch.rand(labels.shape, generator=g) < LABEL_DROPOUT, NULL_CLASS, labels)


def loss_fn(unet, sched: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction DSM loss at uniform integer timesteps."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)  # [B]
    eps = torch.randn(x0.shape, generator=g)  # [B, 1, 16, 16]
    x_t = sched.add_noise(x0, eps, t)  # sqrt(abar) x0 + sqrt(1 - abar) eps
    return F.mse_loss(unet(x_t, t, class_labels=drop_labels(labels, g)).sample, eps)


def score(unet, sched: DDPMScheduler, classifier, real_features) -> dict:
    """50-step DDIM accuracy / FID at EVAL_GUIDANCE on EVAL_SAMPLES seeded samples."""
    fn = lambda y, z, w: st.sample_unet(unet, dict(sched.config), y, z, w, 50, NULL_CLASS)  # noqa: E731
    return st.evaluate(fn, (1, 16, 16), EVAL_GUIDANCE, EVAL_SAMPLES, 150, classifier, real_features)


def main() -> None:
    args = common.base_parser(__doc__, "assets/teachers/digits-unet", steps=2400, batch=64, lr=1e-3).parse_args()
    g = common.setup(args.seed)
    x_train, y_train = load_digits_images("train", 16)
    unet, sched = build_unet(), build_scheduler()
    print(f"UNet2DModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    opt, lr_sched = common.make_optimizer(unet, args.lr, args.steps, warmup=200)
    ema = common.EMA(unet, EMA_DECAY)
    progress = common.Progress(args.steps, every=100)
    for step, idx in zip(range(args.steps), common.batches(len(x_train), args.batch, g)):
        loss = loss_fn(unet, sched, x_train[idx], y_train[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(unet)
        progress.log(step, loss=loss.item())
    seconds = progress.elapsed()
    finish(args, unet.eval(), ema.model, sched, seconds)


def finish(args, unet, ema_unet, sched, seconds: float) -> None:
    """Pick raw vs EMA by samples, save the folder and stepdistill_teacher.json."""
    classifier = load_digits_classifier()
    real = classifier.features(load_digits_images("all")[0]).numpy()
    scores = {"raw": score(unet, sched, classifier, real), "ema": score(ema_unet, sched, classifier, real)}
    print("raw:", scores["raw"], "\nema:", scores["ema"])
    pick = "ema" if st.choose_scale([scores["ema"], scores["raw"]]) is scores["ema"] else "raw"
    print(f"shipping the {pick} weights")
    out = common.Path(args.out)
    (ema_unet if pick == "ema" else unet).save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    common.write_json(out / "stepdistill_teacher.json", {
        "name": "digits-unet", "family": "unet",
        "description": "class-conditional DDPM UNet2DModel on 16x16 scikit-learn digits (epsilon, cosine betas)",
        "resolution": 16, "channels": 1, "latent": False, "num_classes": NUM_CLASSES, "null_class": NULL_CLASS,
        "prediction_type": "epsilon", "recommended_guidance_scale": EVAL_GUIDANCE,
        "data": "sklearn digits, train split (1437 images, stratified 80/20, split seed 0)",
        "training": common.training_record(args, seconds, ema_decay=EMA_DECAY, shipped_weights=pick,
                                           label_dropout=LABEL_DROPOUT, selection=scores),
    })
    print(f"wrote {out} in {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
