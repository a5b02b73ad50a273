"""dmd2, vsd and sid take a one-step student to every mode of the 2-D 8-Gaussian ring (shipped recipes).

Same measurement as tests/test_convergence.py (DMD): sliced 2-Wasserstein to exact teacher
samples (4000 each) before and after training, and nearest-mode shares. Band: every mode's
share within a factor of 2 of its true weight 1/8 (so >= 6.25%, well above 1%). Training time is
a benchmark, not a test: ``python eval/bench_toy.py``.
"""

import pytest

from conftest import train_on_ring


@pytest.mark.parametrize("objective", ["dmd2", "vsd", "sid"])
def test_one_step_student_covers_every_mode(tmp_path, objective):
    before, after, shares, near, cpu_seconds = train_on_ring(f"toy2d/{objective}", tmp_path / objective)
    print(f"{objective}: SW untrained {before:.3f} -> trained {after:.3f} ({before / after:.1f}x); shares "
          f"{[round(s, 3) for s in shares.tolist()]}; within 0.5 of a mode {near:.2f}; training CPU {cpu_seconds:.1f}s")
    assert before / after >= 5, f"SW improved only {before / after:.1f}x"
    assert bool(((shares > 0.125 / 2) & (shares < 0.125 * 2)).all()), shares.tolist()
    assert near > 0.4, "most samples should sit on a mode, not between modes"
