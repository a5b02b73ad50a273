"""Network passes per update, per objective, against the minimum the method needs (issue 17, item 9).

For each shipped ``digits-unet/<objective>`` recipe this hooks the forward of every diffusers
network of the run (the frozen teacher, the student, the fake score; a LoRA network on the
teacher's base is told apart by its active adapter) and counts, per phase update:

* ``fwd``: forward passes without a graph, and ``graph``: forward passes inside the loss's graph
  (each is backpropagated once by that update: through the weights for the phase's own network,
  through the input only for frozen networks, as SiD's teacher);
* both in units of one batch (B rows), so a CFG call on a concatenated [2B] batch counts 2.

Counts are taken with and without CFG (every guidance scale of the objective at 2, or at 1) and
compared with the minimum each method needs (``MINIMUM``, from the papers; C = 2 with CFG, else 1).
Then it times rounds at the recipe's batch and reports updates/s and samples/s (updates x batch,
the peer's count). The machine this ran on was shared and loaded; the samples/s are relative.

    OMP_NUM_THREADS=1 python eval/bench_passes.py [--objectives dmd sid ...] [--rounds 3] [--threads 1]

Writes eval/results/bench_passes.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["dmd", "dmd2", "vsd", "sid", "lcm", "scm", "ladd"]

# guidance fields per objective: all set to 2 ("cfg") or to 1 ("no_cfg")
GUIDANCE = {"dmd": ["guidance_scale"], "dmd2": ["guidance_scale"], "vsd": ["guidance_scale"],
            "sid": ["guidance_scale", "fake_guidance_scale", "fake_train_guidance_scale"],
            "lcm": ["guidance_scale_min", "guidance_scale_max"], "scm": ["guidance_scale_min", "guidance_scale_max"],
            "ladd": ["guidance_scale"]}

# Minimum passes per update in batch units, {phase: {network: (fwd, graph)}}; C = 2 with CFG, 1 without.
# Text: what the paper's update needs (reference objectives.md sections in brackets).
MINIMUM = {
    "dmd": (lambda C: {"fake_score": {"student": (1, 0), "fake_score": (0, 1)},
                       "student": {"student": (0, 1), "teacher": (C, 0), "fake_score": (1, 0)}},
            "G: 1 student fwd+bwd, teacher cond+uncond, fake 1 fwd (fake CFG 1); critic: 1 student fwd (no grad), "
            "fake 1 fwd+bwd [DMD2 3.3-3.4]"),
    "dmd2": (lambda C: {"fake_score": {"student": (1, 0), "fake_score": (0, 1), "fake_score(GAN features)": (0, 2)},
                        "student": {"student": (0, 1), "teacher": (C, 0), "fake_score": (1, 0),
                                    "fake_score(GAN features)": (0, 1)}},
             "as DMD, plus the GAN head on fake-UNet features: critic real + fake, G fake (DMD2 3.5; upstream runs "
             "the encoder only, here a full fake forward); "
             "upstream reuses the G turn's sample for one critic update per round (DMD2 3.4)"),
    "vsd": (lambda C: {"fake_score": {"student": (1, 0), "fake_score": (0, 1)},
                       "student": {"student": (0, 1), "teacher": (C, 0), "fake_score": (C, 0)}},
            "G: student fwd+bwd, teacher and LoRA fake both cond+uncond (same w, SwiftBrush); critic: student fwd, "
            "fake fwd+bwd [5]"),
    "sid": (lambda C: {"fake_score": {"student": (1, 0), "fake_score": (0, C)},
                       "student": {"student": (0, 1), "teacher": (0, C), "fake_score": (0, C)}},
            "G: student fwd+bwd, teacher and fake in the graph through x_t (kappa4, kappa2: cond+uncond each); "
            "critic: student fwd, fake DSM fwd+bwd (kappa1 guided: cond+uncond) [SiD 7.1, SiD-LSG 7.3]"),
    "lcm": (lambda C: {"student": {"student": (1, 1), "teacher": (C, 0)}},
            "student fwd+bwd at t_n, teacher cond+uncond (one DDIM solver step), target = stop-grad student 1 fwd "
            "[LCM 8.2]"),
    "scm": (lambda C: {"student": {"student": (1, 1), "teacher": (C, 0)}},
            "sCD: teacher cond+uncond for dx/dt, student 1 JVP pass (no grad; counted as 1 fwd), student fwd+bwd "
            "[sCM 9.1]"),
    "ladd": (lambda C: {"discriminator": {"student": (1, 0), "teacher": (2, 0)},
                        "student": {"student": (0, 1), "teacher": (0, 1)}},
             "G: student fwd+bwd, teacher features on the re-noised fake in the graph (input grad); D: student fwd, "
             "teacher features on real + fake (head trains only) [LADD 11]"),
}


def _network_name(module, names: dict[int, str]) -> str:
    from stepdistill.training.networks import tuner_layers

    name = names[id(module)]
    layers = tuner_layers(module)
    if layers:  # a shared base: its active adapter says which network this call is
        layer = layers[0]
        return name if layer._disable_adapters else layer._active_adapter[0]
    return name


def hook_networks(tr, counts: dict) -> list:
    """Forward hooks on every diffusers network of the trainer's run; counts[(network, 'fwd'|'graph')] += rows / B."""
    import torch

    from stepdistill.training.networks import inner_model

    modules = {id(inner_model(tr.teacher.denoiser)): ("teacher", inner_model(tr.teacher.denoiser))}
    for name, t in tr.trainables.items():
        if name not in ("student", "fake_score"):  # heads (GAN, logvar) are not diffusers networks
            continue
        m = inner_model(t.module)
        if id(m) not in modules:
            modules[id(m)] = (name, m)
    names = {k: v[0] for k, v in modules.items()}
    batch = tr.cfg.train.batch_size

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        out = getattr(output, "sample", output[0] if isinstance(output, tuple) else output)
        kind = "graph" if (torch.is_grad_enabled() and getattr(out, "requires_grad", False)) else "fwd"
        counts[(_network_name(module, names), kind)] += x.shape[0] / batch

    return [m.register_forward_hook(hook, with_kwargs=True) for _, m in modules.values()]


def trainer_for(objective: str, overrides: list[str], run_dir: Path):
    from stepdistill.config import load_config
    from stepdistill.training.trainer import Trainer

    cfg = load_config(f"digits-unet/{objective}", ["train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=0",
                                                   "train.num_sample_images=4"] + overrides)
    return Trainer(cfg, run_dir, progress=False)


def count_passes(objective: str, cfg_scale: float, tmp: Path) -> dict:
    """{phase: {network: {"fwd": n, "graph": n}}} per single update, batch 8, guidance fields at cfg_scale."""
    over = [f"objective.{k}={cfg_scale}" for k in GUIDANCE[objective]] + ["train.batch_size=8"]
    tr = trainer_for(objective, over, tmp / f"{objective}-count-{cfg_scale}")
    out = {}
    for phase in tr.objective.phases:
        tr.update(phase)  # warm-up (pair sets, caches) outside the count
        counts: dict = defaultdict(float)
        handles = hook_networks(tr, counts)
        try:
            tr.update(phase)
        finally:
            for h in handles:
                h.remove()
        per: dict = defaultdict(lambda: {"fwd": 0.0, "graph": 0.0})
        for (net, kind), n in counts.items():
            per[net][kind] = n
        out[phase] = dict(per)
    return out


def minimum(objective: str, cfg: bool) -> dict:
    table = MINIMUM[objective][0](2 if cfg else 1)
    return {ph: {net: {"fwd": f, "graph": g} for net, (f, g) in nets.items()} for ph, nets in table.items()}


def excess(measured: dict, needed: dict) -> dict:
    """Passes above the minimum, per phase (fwd and graph summed over networks; DMD2's GAN features come from
    a full fake-score forward here, so its encoder entries count as fake-score passes)."""
    out = {}
    for phase, nets in needed.items():
        got = measured.get(phase, {})
        out[phase] = {kind: round(sum(v[kind] for v in got.values()) - sum(v[kind] for v in nets.values()), 3)
                      for kind in ("fwd", "graph")}
    return out


def time_rounds(objective: str, rounds: int, tmp: Path) -> dict:
    """Rounds at the recipe's own batch and guidance: seconds per round, updates/s, samples/s."""
    tr = trainer_for(objective, [], tmp / f"{objective}-time")
    per_round = sum(tr.objective.phases.values())
    batch = tr.cfg.train.batch_size * tr.cfg.train.grad_accum

    def one_round():
        for phase, n in tr.objective.phases.items():
            for _ in range(n):
                tr.update(phase)

    one_round()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    return {"batch": batch, "updates_per_round": per_round, "phases": dict(tr.objective.phases),
            "seconds_per_round_median": round(sec, 3), "updates_per_s": round(per_round / sec, 3),
            "samples_per_s": round(per_round * batch / sec, 1), "student_samples_per_s": round(batch / sec, 1),
            "rounds_timed": rounds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per objective (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timing", action="store_true", help="pass counts only")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_passes.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for obj in args.objectives:
            row = {"objective": obj, "recipe": f"digits-unet/{obj}", "minimum_text": MINIMUM[obj][1]}
            for tag, scale in (("cfg", 2.0), ("no_cfg", 1.0)):
                measured = count_passes(obj, scale, tmp)
                need = minimum(obj, tag == "cfg")
                row[tag] = {"measured": measured, "minimum": need, "excess": excess(measured, need)}
            if not args.no_timing:
                row["timing"] = time_rounds(obj, args.rounds, tmp)
            rows.append(row)
            print(_line(row), flush=True)
    result = {"protocol": {"teacher": "digits-unet", "counts": "forward hooks on the diffusers networks, one update per "
                           "phase after one warm-up update, batch 8, in batch units (a [2B] CFG call counts 2)",
                           "timing": f"median of {args.rounds} rounds after 1 warm-up, recipe batch and guidance, "
                                     f"torch threads {args.threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
                                      f"(load average {os.getloadavg()[0]:.1f} at the end): samples/s are indicative",
                           "torch": torch.__version__},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _line(row) -> str:
    ex = row["cfg"]["excess"]
    extra = ", ".join(f"{ph}: +{v['fwd']:g} fwd +{v['graph']:g} graph" for ph, v in ex.items())
    t = row.get("timing")
    speed = f"; {t['updates_per_s']} updates/s, {t['samples_per_s']} samples/s at batch {t['batch']}" if t else ""
    return f"{row['objective']:5s} above minimum (CFG): {extra}{speed}"


if __name__ == "__main__":
    raise SystemExit(main())
