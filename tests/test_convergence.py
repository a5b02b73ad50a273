"""DMD takes a one-step student to every mode of the 2-D 8-Gaussian ring (the shipped recipe).

Distance: sliced 2-Wasserstein (256 random directions, 4000 samples each) to exact teacher
samples. Mode coverage: each mode's share of nearest-mode assignments within a factor of 2 of
its true weight 1/8. Both measured against the untrained one-step student (the teacher-fitted
denoiser evaluated once at t = 1, which collapses to the ring's centre).
"""

from conftest import train_on_ring


def test_dmd_one_step_student_covers_every_mode(tmp_path):
    before, after, shares, near, cpu_seconds = train_on_ring("toy2d/dmd", tmp_path / "dmd")
    print(f"SW untrained {before:.3f} -> trained {after:.3f} ({before / after:.1f}x); shares {shares.tolist()}; "
          f"within 0.5 of a mode {near:.2f}; training CPU {cpu_seconds:.1f}s")
    assert before / after >= 5, f"SW improved only {before / after:.1f}x"
    assert bool(((shares > 0.125 / 2) & (shares < 0.125 * 2)).all()), shares.tolist()
    assert near > 0.4, "most samples should sit on a mode, not between modes"
