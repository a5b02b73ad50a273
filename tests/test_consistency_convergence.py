"""LCM and sCM take a one-step student to every mode of the 2-D 8-Gaussian ring (the shipped recipes).

Mode coverage: each of the 8 modes gets at least 1% of the nearest-mode assignments of 4000
one-step samples; training (after the denoising fit of init=fit) stays within a minute of
process CPU time on one thread. Also reported: sliced 2-Wasserstein distance to exact teacher
samples before and after (the untrained one-step student collapses to the ring's centre).
"""

import time

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.metrics.toy import mode_shares, sliced_wasserstein
from stepdistill.trainer import Trainer


@pytest.mark.parametrize("recipe", ["toy2d/lcm", "toy2d/scm"])
def test_one_step_student_covers_every_mode(tmp_path, recipe):
    torch.set_num_threads(1)
    cfg = load_config(recipe, ["train.sample_every=0", "train.checkpoint_every=0", "train.log_every=100000"])
    trainer = Trainer(cfg, tmp_path / recipe.replace("/", "_"), progress=False)
    gm = trainer.teacher.denoiser
    reference = gm.sample(4000, torch.Generator().manual_seed(7))
    before = sliced_wasserstein(trainer.generate(4000, seed=3), reference)
    start = time.process_time()
    trainer.run()
    cpu_seconds = time.process_time() - start
    x = trainer.generate(4000, seed=3)
    after = sliced_wasserstein(x, reference)
    shares = mode_shares(x, gm.means)  # [8]
    print(f"{recipe}: SW {before:.3f} -> {after:.3f}; shares {[round(v, 3) for v in shares.tolist()]}; CPU {cpu_seconds:.1f}s")
    assert bool((shares >= 0.01).all()), f"a mode below 1%: {shares.tolist()}"
    assert after < 0.6 * before, f"SW {before:.3f} -> {after:.3f}"
    assert cpu_seconds < 60, f"training took {cpu_seconds:.1f}s of CPU"
