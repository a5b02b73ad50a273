"""Train the embedded class-conditional rectified-flow teacher -> assets/teachers/digits-flow/.

    python train/teachers/digits_flow.py --out assets/teachers/digits-flow

- ``transformer/``: diffusers DiTTransformer2DModel in pixel space (1x16x16 in [-1, 1]),
  patch 2 (64 tokens), ``norm_type="ada_norm_zero"``, ``num_embeds_ada_norm=10``: its label
  table has 11 rows, the null label (classifier-free guidance) at index 10.
- ``scheduler/``: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).

Rectified flow (SD3 convention): x_s = (1 - s) x0 + s noise, the network predicts the velocity
v = noise - x0, and its timestep input is s * 1000 (what FlowMatchEulerDiscreteScheduler
passes). s is drawn uniformly on [0, 1] rather than logit-normal: distillation objectives query
the teacher at every s, including the ends (one-step students start at s = 1), so the teacher
should be trained evenly there.

Label dropout is done here, explicitly, with the seeded generator (10% -> label 10). diffusers'
LabelEmbedding would also drop labels with its own dropout_prob (0.1, global RNG) whenever the
module is in train mode; that built-in dropout is switched off during training so the rate is
exactly 10% and reproducible. (It is not part of the saved config: a reloaded model has
dropout_prob 0.1 again, which only matters in train mode; teachers are used in eval mode.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import LabelEmbedding

import common
import sample_teacher as st
from stepdistill.training.data.digits import load_digits_images
from stepdistill.evaluation.digits_classifier import load_digits_classifier

NUM_CLASSES, NULL_CLASS, LABEL_DROPOUT = 10, 10, 0.1
EMA_DECAY = 0.999
EVAL_GUIDANCE, EVAL_SAMPLES = 2.0, 300


def build_transformer() -> DiTTransformer2DModel:
    """6 layers, hidden 128 (4 heads x 32), ~2M parameters."""
    return DiTTransformer2DModel(
        in_channels=1, out_channels=1, sample_size=16, patch_size=2, num_layers=6,
        num_attention_heads=4, attention_head_dim=32, norm_type="ada_norm_zero",
        num_embeds_ada_norm=NUM_CLASSES, attention_bias=True, activation_fn="gelu-approximate",
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def disable_builtin_label_dropout(model: torch.nn.Module) -> None:
    """LabelEmbedding drops labels on its own in train mode; we drop them explicitly instead."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def drop_labels(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Replace LABEL_DROPOUT of the labels by the null class."""
    return torch.where(torch.rand(labels.shape, generator=g) < LABEL_DROPOUT, NULL_CLASS, labels)


def loss_fn(model, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity loss with s ~ U[0, 1]."""
    s = torch.rand(len(x0), generator=g)  # [B]
    noise = torch.randn(x0.shape, generator=g)  # [B, 1, 16, 16]
    x_s = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise  # [B, 1, 16, 16]
    v = model(x_s, timestep=s * 1000, class_labels=drop_labels(labels, g)).sample  # [B, 1, 16, 16]
    return F.mse_loss(v, noise - x0)


def score(model, sched, classifier, real_features) -> dict:
    """50-step FlowMatchEuler accuracy / FID at EVAL_GUIDANCE on EVAL_SAMPLES seeded samples."""
    fn = lambda y, z, w: st.sample_flow(model, dict(sched.config), y, z, w, 50, NULL_CLASS)  # noqa: E731
    return st.evaluate(fn, (1, 16, 16), EVAL_GUIDANCE, EVAL_SAMPLES, 150, classifier, real_features)


def main() -> None:
    args = common.base_parser(__doc__, "assets/teachers/digits-flow", steps=3000, batch=64, lr=5e-4).parse_args()
    g = common.setup(args.seed)
    x_train, y_train = load_digits_images("train", 16)
    model, sched = build_transformer(), build_scheduler()
    disable_builtin_label_dropout(model)
    print(f"DiTTransformer2DModel: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt, lr_sched = common.make_optimizer(model, args.lr, args.steps, warmup=200)
    ema = common.EMA(model, EMA_DECAY)
    progress = common.Progress(args.steps, every=100)
    for step, idx in zip(range(args.steps), common.batches(len(x_train), args.batch, g)):
        loss = loss_fn(model, x_train[idx], y_train[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(model)
        progress.log(step, loss=loss.item())
    finish(args, model.eval(), ema.model, sched, progress.elapsed())


def finish(args, model, ema_model, sched, seconds: float) -> None:
    """Pick raw vs EMA by samples, save the folder and stepdistill_teacher.json."""
    classifier = load_digits_classifier()
    real = classifier.features(load_digits_images("all")[0]).numpy()
    scores = {"raw": score(model, sched, classifier, real), "ema": score(ema_model, sched, classifier, real)}
    print("raw:", scores["raw"], "\nema:", scores["ema"])
    pick = "ema" if st.choose_scale([scores["ema"], scores["raw"]]) is scores["ema"] else "raw"
    print(f"shipping the {pick} weights")
    out = common.Path(args.out)
    (ema_model if pick == "ema" else model).save_pretrained(out / "transformer", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    common.write_json(out / "stepdistill_teacher.json", {
        "name": "digits-flow", "family": "flow",
        "description": "class-conditional rectified-flow DiT (pixel space) on 16x16 scikit-learn digits",
        "resolution": 16, "channels": 1, "latent": False, "num_classes": NUM_CLASSES, "null_class": NULL_CLASS,
        "prediction_type": "flow", "recommended_guidance_scale": EVAL_GUIDANCE,
        "time_convention": "x_s = (1 - s) x0 + s noise, v = noise - x0, timestep input s * 1000",
        "data": "sklearn digits, train split (1437 images, stratified 80/20, split seed 0)",
        "training": common.training_record(args, seconds, ema_decay=EMA_DECAY, shipped_weights=pick,
                                           label_dropout=LABEL_DROPOUT, s_distribution="uniform", selection=scores),
    })
    print(f"wrote {out} in {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
