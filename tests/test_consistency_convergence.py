"""LCM and sCM take a one-step student to every mode of the 2-D 8-Gaussian ring (the shipped recipes).

Mode coverage: each of the 8 modes gets at least 1% of the nearest-mode assignments of 4000
one-step samples. Also reported: sliced 2-Wasserstein distance to exact teacher
samples before and after (the untrained one-step student collapses to the ring's centre).
Training time is a benchmark, not a test: ``python eval/bench_toy.py``.
"""

import pytest

from conftest import train_on_ring


@pytest.mark.parametrize("recipe", ["toy2d/lcm", "toy2d/scm"])
def test_one_step_student_covers_every_mode(tmp_path, recipe):
    before, after, shares, _, cpu_seconds = train_on_ring(recipe, tmp_path / recipe.replace("/", "_"))
    print(f"{recipe}: SW {before:.3f} -> {after:.3f}; shares {[round(v, 3) for v in shares.tolist()]}; CPU {cpu_seconds:.1f}s")
    assert bool((shares >= 0.01).all()), f"a mode below 1%: {shares.tolist()}"
    assert after < 0.6 * before, f"SW {before:.3f} -> {after:.3f}"
