"""What a run reports: ``metrics.jsonl``, the console, accelerate's trackers (``train.report_to``), images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import to_dict
from ..contract import StepdistillError
from .rundir import flat


def tracker_names(report_to: str) -> list[str]:
    """``train.report_to`` -> accelerate tracker names; a tracker whose package is missing is a one-line error."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in str(report_to).split(",") if n.strip() and n.strip() != "none"]
    if "all" in names:
        return [str(t.value) for t in get_available_trackers()]
    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise StepdistillError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, "
                                   "all or none")
        if name not in available:
            raise StepdistillError(f"train.report_to={name} needs the {name} package: pip install {name} "
                                   "(or train.report_to=none)")
    return list(dict.fromkeys(names))


class Reporter:
    """Writes one record per ``train.log_every`` rounds to every sink (main process only)."""

    def __init__(self, accelerator, run_dir: Path, cfg, log):
        self.accelerator, self.run_dir, self.cfg, self.log = accelerator, Path(run_dir), cfg, log

    def start(self, step: int) -> bool:
        """accelerate's trackers under ``<run>``; tensorboard writes ``<run>/tensorboard`` (a resume purges later events)."""
        if not self.accelerator.log_with:
            return False
        self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step or None}})
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":  # tensorboard's hparams would add a folder; config.yaml holds the config
                tracker.store_init_configuration(flat(to_dict(self.cfg)))
        return True

    def metrics(self, step: int, window: dict, lrs: dict, elapsed: float, bar) -> None:
        means = {k: sum(v) / len(v) for k, v in window.items() if v} | lrs
        record = {"step": step, "elapsed_s": round(elapsed, 2)} | {k: float(f"{v:.6g}") for k, v in means.items()}  # 6 significant digits: small norms keep theirs
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(means, step=step)
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.endswith("/loss")}, refresh=False)
        keys = sorted(k for k in means if k.endswith("loss") or "grad_norm" in k)
        self.log(f"round {step}/{self.cfg.train.steps} " + " ".join(f"{k}={means[k]:.4g}" for k in keys))

    def images(self, images: torch.Tensor, step: int) -> None:
        """Sample images [N, C, H, W] in [0, 1] to every tracker that takes images (tensorboard: NCHW; others: HWC uint8)."""
        arrays = [(im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for im in images]
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"samples": images if tracker.name == "tensorboard" else arrays}, step=step)

    def sample_grid(self, x: torch.Tensor, teacher, step: int, title: str, track: bool) -> Path:
        """Decode (latent teachers) and save the samples as a grid; 2-D samples get the teacher's exact ones beside."""
        from ..viz import save_samples

        x = teacher.decode(x) if teacher.decode is not None else x
        ref = None
        if teacher.sample_data is not None and x.ndim == 2:
            g = torch.Generator().manual_seed(1)
            ref = teacher.sample_data(1000, g, teacher.conditioner(1000, g)[0])
        path = save_samples(x.cpu(), self.run_dir / "samples" / f"step_{step:07d}.png", ref, title=title)
        if track and x.ndim == 4:
            self.images((x.float().clamp(-1, 1) * 0.5 + 0.5)[:, :3].cpu(), step)  # [N, C, H, W] in [0, 1]
        return path
