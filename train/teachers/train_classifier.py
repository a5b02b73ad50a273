"""Train the digits feature network (classifier + FID features) -> assets/feature_net/.

    python train/teachers/train_classifier.py --out assets/feature_net

A small CNN (stepdistill.evaluation.digits_classifier.DigitsClassifier) on the 80/20 stratified
train split (seed 0) at 16x16, with light augmentation: random shifts of up to 2 pixels
(one original 8x8 pixel) and a little Gaussian pixel noise, so that slightly imperfect
generated digits are still read correctly. Reports held-out accuracy on the test split and
records it in config.json.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from stepdistill.training.data.digits import load_digits_images
from stepdistill.evaluation.digits_classifier import DigitsClassifier, save_digits_classifier

SPLIT_SEED = 0
MAX_SHIFT = 2  # pixels at 16x16
NOISE_STD = 0.1  # in [-1, 1] units


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift + small Gaussian noise, [N, 1, 16, 16]."""
    x = common.random_shift(x, MAX_SHIFT, g)
    return x + NOISE_STD * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model.predict(x) == y).float().mean().item()
    model.train(was_training)
    return acc


def main() -> None:
    args = common.base_parser(__doc__, "assets/feature_net", steps=3000, batch=128, lr=2e-3).parse_args()
    g = common.setup(args.seed)
    x_train, y_train = load_digits_images("train", 16, SPLIT_SEED)
    x_test, y_test = load_digits_images("test", 16, SPLIT_SEED)
    model = DigitsClassifier()
    opt, sched = common.make_optimizer(model, args.lr, args.steps, warmup=100, weight_decay=1e-4)
    progress = common.Progress(args.steps, every=250)
    for step, idx in zip(range(args.steps), common.batches(len(x_train), args.batch, g)):
        loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.log(step, loss=loss.item())
    seconds = progress.elapsed()
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    print(f"train accuracy {train_acc:.4f}  held-out test accuracy {test_acc:.4f}  ({seconds:.0f}s)")
    save_digits_classifier(model.eval(), args.out, {
        "split_seed": SPLIT_SEED, "resolution": 16, "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4), "num_test": len(y_test),
        "training": common.training_record(args, seconds, max_shift=MAX_SHIFT, noise_std=NOISE_STD),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
