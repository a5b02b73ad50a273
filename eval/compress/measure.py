"""Parameters per compress plan on the embedded teachers, and the 1-step latency of a compressed vs
a full digits-unet student (CPU, one thread). Run: OMP_NUM_THREADS=1 python eval/compress/measure.py
(writes eval/compress/results.json next to this file)."""

import json
import statistics
import time
from pathlib import Path

import torch

from stepdistill.adapters.compress import compress_model
from stepdistill.contract import StepdistillError
from stepdistill.teachers import load_teacher
from stepdistill.training.networks import compressed_copy, full_copy

torch.set_num_threads(1)
PLANS = ("bk", "bk-base", "bk-small", "bk-tiny", "mid", "mid+inner")


def params(m):
    return sum(p.numel() for p in m.parameters())


def plan_table():
    rows = []
    for name in ("digits-unet", "digits-vunet", "digits-sd"):
        model = load_teacher(name).denoiser.model
        for plan in PLANS:
            try:
                s = compress_model(model, plan, log=lambda _m: None)
                c = s._stepdistill_compression
                rows.append({"teacher": name, "plan": plan, "cuts": "+".join(c.cuts), "params": params(s),
                             "teacher_params": params(model), "ratio": round(params(s) / params(model), 4), "fresh": len(c.fresh)})
            except StepdistillError as e:
                rows.append({"teacher": name, "plan": plan, "error": str(e)})
    return rows


@torch.no_grad()
def latency(net, batch, reps=50):
    x = torch.randn(batch, 1, 16, 16)
    t = torch.full((batch,), 0.95)
    cond = {"class_labels": torch.randint(0, 10, (batch,))}
    for _ in range(5):
        net(x, t, cond)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        net(x, t, cond)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    rows = plan_table()
    teacher = load_teacher("digits-unet").denoiser
    full, small = full_copy(teacher), compressed_copy(teacher, "bk", log=lambda _m: None)
    lat = {f"batch{b}": {"full_ms": round(latency(full, b), 3), "compressed_bk_ms": round(latency(small, b), 3)} for b in (1, 64)}
    out = {"plans": rows, "digits_unet_1step_latency_median_ms": lat,
           "machine": "2 CPU cores shared with other jobs, OMP_NUM_THREADS=1, torch.set_num_threads(1), median of 50 calls"}
    (Path(__file__).parent / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(lat))
