"""Train the fourth embedded teacher, a different kind of VP model -> assets/teachers/digits-vunet/.

    python train/teachers/digits_vunet.py --out assets/teachers/digits-vunet

It exists to hold the shipped recipes to a teacher they were not written for (issue 17): the
same 16x16 digits as ``digits-unet`` but every teacher-side default differs.

- ``unet/``: diffusers UNet2DModel, 1x16x16 pixels in [-1, 1], **v-prediction**, classes via
  ``num_class_embeds=10``: labels 0-9 only, **no null class** (no label dropout), so it runs
  without classifier-free guidance (``recommended_guidance_scale`` 1).
- ``scheduler/``: DDPMScheduler, 1000 steps, ``beta_schedule="scaled_linear"`` (Stable
  Diffusion's betas, 0.00085..0.012; alpha_bar(999) = 0.0047) instead of digits-unet's cosine.
- A different layout: two resolution levels (32, 64 channels), two layers per block, attention
  at 8x8 on the way down and up.

Training as digits-unet (AdamW, warmup + cosine LR, EMA; raw vs EMA picked by 50-step DDIM
samples, here unguided).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

import common
import sample_teacher as st
from stepdistill.training.data.digits import load_digits_images
from stepdistill.evaluation.digits_classifier import load_digits_classifier

NUM_CLASSES = 10
EMA_DECAY = 0.999
EVAL_GUIDANCE, EVAL_SAMPLES = 1.0, 300


def build_unet() -> UNet2DModel:
    """~1M parameters; two levels, attention at 8x8."""
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=2, norm_num_groups=8,
        block_out_channels=(32, 64), attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="v_prediction")


def loss_fn(unet, sched: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """v-prediction DSM loss at uniform integer timesteps: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)  # [B]
    eps = torch.randn(x0.shape, generator=g)  # [B, 1, 16, 16]
    x_t = sched.add_noise(x0, eps, t)
    return F.mse_loss(unet(x_t, t, class_labels=labels).sample, sched.get_velocity(x0, eps, t))


@torch.no_grad()
def sample(unet, scheduler_config: dict, labels, noise, steps: int = 50) -> torch.Tensor:
    """Unguided DDIM (eta 0); returns x0 [B, 1, 16, 16] in [-1, 1]."""
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def score(unet, sched: DDPMScheduler, classifier, real_features) -> dict:
    """50-step unguided DDIM accuracy / FID on EVAL_SAMPLES seeded samples."""
    fn = lambda y, z, w: sample(unet, dict(sched.config), y, z)  # noqa: E731
    return st.evaluate(fn, (1, 16, 16), EVAL_GUIDANCE, EVAL_SAMPLES, 150, classifier, real_features)


def main() -> None:
    args = common.base_parser(__doc__, "assets/teachers/digits-vunet", steps=2400, batch=64, lr=1e-3).parse_args()
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
    classifier = load_digits_classifier()
    real = classifier.features(load_digits_images("all")[0]).numpy()
    scores = {"raw": score(unet.eval(), sched, classifier, real), "ema": score(ema.model, sched, classifier, real)}
    print("raw:", scores["raw"], "\nema:", scores["ema"])
    pick = "ema" if st.choose_scale([scores["ema"], scores["raw"]]) is scores["ema"] else "raw"
    print(f"shipping the {pick} weights")
    out = common.Path(args.out)
    (ema.model if pick == "ema" else unet).save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    common.write_json(out / "stepdistill_teacher.json", {
        "name": "digits-vunet", "family": "unet",
        "description": "class-conditional DDPM UNet2DModel on 16x16 scikit-learn digits "
                       "(v-prediction, scaled-linear betas, no null class)",
        "resolution": 16, "channels": 1, "latent": False, "num_classes": NUM_CLASSES, "null_class": None,
        "prediction_type": "v_prediction", "recommended_guidance_scale": EVAL_GUIDANCE,
        "data": "sklearn digits, train split (1437 images, stratified 80/20, split seed 0)",
        "training": common.training_record(args, seconds, ema_decay=EMA_DECAY, shipped_weights=pick,
                                           label_dropout=0.0, selection=scores),
    })
    print(f"wrote {out} in {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
