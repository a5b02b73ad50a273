"""The one training loop (accelerate): everything that is not the math.

Per round, each phase of the objective runs its number of updates (e.g. 5 critic, 1 student).
Per update: gradient isolation, ``grad_accum`` micro-batches, the non-finite guard, clipping,
the optimizer and LR-scheduler step, the student EMA. The frozen teacher is never prepared.
Beside it: ``run.py`` (networks), ``optim.py`` (accelerator, optimizers, EMA), ``checkpoint.py``,
``rundir.py`` (lock, resume checks), ``reporting.py``, ``signals.py``, ``guard.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import RunConfig, save_config, to_dict
from ..contract import StepdistillError
from ..objectives.feature_distill import with_feature_term
from ..sampling import few_step_sample
from .checkpoint import latest_checkpoint, load_newest, save_checkpoint
from .data import BatchSampler, load_real
from .guard import NonFiniteError, NonFiniteGuard
from .memory import apply_memory_levers
from .networks import Net, unwrap
from .optim import make_accelerator, make_ema, prepare
from .reporting import Reporter
from .run import Trainable, build_run, swapped
from .rundir import RunFolderLock, check_resume_config, check_run_dir, training_summary
from .signals import StopSignal


class Trainer:
    """Runs an objective over its networks; see the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.accelerator = make_accelerator(cfg, self.run_dir)
        self.lock = RunFolderLock(self.run_dir)
        try:
            self._lock()
            self._setup(resume)
        except BaseException:
            self.release()
            raise

    def _setup(self, resume: bool) -> None:
        from accelerate.utils import set_seed

        cfg, tc = self.cfg, self.cfg.train
        check_run_dir(self.run_dir, cfg, resume)
        set_seed(tc.seed)  # network initialisation (e.g. the MLP denoisers) is seeded too
        self.objective = with_feature_term(cfg.objective, cfg.student.feature_weight, cfg.student.feature_layers)
        run = build_run(cfg, self.accelerator.device, self.log, fit=not resume)
        if resume:
            check_resume_config(self.run_dir, cfg)
        self.run_parts, self.teacher, self.trainables = run, run.teacher, run.trainables
        apply_memory_levers(self.trainables, self.teacher, cfg, self.accelerator.device, self.log)
        self.module_names, self.lora_modules = prepare(self.accelerator, self.trainables, self.objective, tc.steps)
        self.nets = run.views()  # over the prepared modules
        rank = self.accelerator.process_index
        real = load_real(cfg.data.real, self.teacher, self.teacher.sample_shape)
        self.sampler = BatchSampler(self.teacher.conditioner, self.teacher.sample_shape, tc.batch_size,
                                    tc.seed * 1000 + rank + 1, self.accelerator.device, real)
        self.rng = torch.Generator().manual_seed(tc.seed * 1000 + rank + 500_000)
        self.ema = make_ema(cfg, self.trainables, self.log)
        self.nets.ema_weights = None if self.ema is None else self.ema_weights()
        self.step, self.updates = 0, defaultdict(int)
        self.guard = NonFiniteGuard(tc.max_nonfinite, self.log)
        self.stop = StopSignal(self.accelerator, self.log)
        self.reporter = Reporter(self.accelerator, self.run_dir, cfg, self.log)
        if resume:
            self._resume()

    @property
    def nonfinite_total(self) -> dict:
        return self.guard.total

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(msg)

    def _lock(self) -> None:
        if self.accelerator.is_main_process:  # one writer per run folder, held until release()
            self.lock.acquire()

    def release(self) -> None:
        """Give up the run-folder lock (``run`` does this when it returns or fails)."""
        self.lock.release()

    def ema_weights(self):
        """A context in which the student's parameters hold their EMA."""
        return swapped(self.trainables["student"].params, self.ema.shadow_params)

    # -- one update ------------------------------------------------------------------------------

    def update(self, phase: str) -> dict[str, float]:
        names = tuple(self.objective.phase_updates(phase))
        unknown = [n for n in names if n not in self.trainables]
        if unknown:
            raise StepdistillError(f"objective phase {phase!r} updates {unknown}, which this run does not train")
        for name, tr in self.trainables.items():  # gradient isolation: only the phase's networks require grad
            for p in tr.params:
                p.requires_grad_(name in names)
        group = [self.trainables[n] for n in names]
        for tr in group:
            tr.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = defaultdict(float)
        accum = self.cfg.train.grad_accum
        for _ in range(accum):
            with self.accelerator.autocast():
                out = self.objective.loss(phase, self.nets, self.sampler.next(), self.rng)
            if not torch.isfinite(out.loss):
                return self._skip(phase, names, "loss", group)
            self.accelerator.backward(out.loss / accum)
            for k, v in {"loss": out.loss.item(), **out.logs}.items():
                logs[k] += v / accum
        for tr in group:
            logs[f"grad_norm_{tr.name}"] = norm = self._clip(tr)
            if not math.isfinite(norm):
                return self._skip(phase, names, f"gradient of {tr.name}", group)
        for tr in group:
            tr.optimizer.step()
            tr.scheduler.step()
            self.updates[tr.name] += 1
            if tr.name == "student" and self.ema is not None:
                self.ema.step(tr.params)
        self.guard.ok(phase)
        return {f"{phase}/{k}": v for k, v in logs.items()}

    def _clip(self, tr: Trainable) -> float:
        params = [p for p in tr.params if p.grad is not None]
        clip = tr.cfg.grad_clip if tr.cfg.grad_clip > 0 else float("inf")
        return float(self.accelerator.clip_grad_norm_(params, clip)) if params else 0.0

    def _skip(self, phase, names, what, group) -> dict[str, float]:
        for tr in group:
            tr.optimizer.zero_grad(set_to_none=True)
        return self.guard.skipped(phase, what, names, self.step, latest_checkpoint(self.run_dir))

    # -- the loop --------------------------------------------------------------------------------

    def run(self, until: int | None = None) -> dict:
        """Train to ``train.steps`` rounds (or stop early after round ``until``, with a checkpoint)."""
        from tqdm import tqdm

        tc = self.cfg.train
        last = tc.steps if until is None else min(until, tc.steps)
        if not self.lock.held:
            self._lock()  # a second run() of this trainer (the first released the folder)
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        tracking = self.reporter.start(self.step)
        self.stop.install()
        bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="round",
                   disable=not (self.progress and self.accelerator.is_main_process), dynamic_ncols=True)
        window: dict[str, list[float]] = defaultdict(list)
        start = time.time()
        try:
            while self.step < last:
                for phase, count in self.objective.phases.items():
                    for _ in range(count):
                        for k, v in self.update(phase).items():
                            window[k].append(v)
                self.step += 1
                bar.update(1)
                self._after_round(window, bar, tracking, last, start)
            final, ckpt = self.sample_grid(track=False), self.save()
        finally:
            self.stop.restore()
            bar.close()
            if tracking:
                self.accelerator.end_training()  # closes the trackers (tensorboard: flushes the event file)
            self.release()
        return {"run_dir": str(self.run_dir), "steps": self.step, "checkpoint": str(ckpt), "samples": str(final),
                "nonfinite": dict(self.guard.total), "seconds": round(time.time() - start, 1)}

    def _after_round(self, window, bar, tracking: bool, last: int, start: float) -> None:
        """Logging, sample grids, checkpoints and the agreed stop at the end of a round."""
        tc = self.cfg.train
        if self.step % tc.log_every == 0 or self.step == last:
            lrs = {f"lr/{n}": tr.scheduler.get_last_lr()[0] for n, tr in self.trainables.items()}
            self.reporter.metrics(self.step, window, lrs, time.time() - start, bar)
            window.clear()
        if tc.sample_every and self.step % tc.sample_every == 0:
            self.sample_grid(track=tracking)
        if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
            if self.guard.streak:  # mid-streak: keep the last good checkpoints as they are
                self.log(f"round {self.step}: checkpoint skipped during a run of non-finite updates")
            else:
                self.save()
        if self.stop.agreed():
            self.save()
            raise StepdistillError(f"stopped by {self.stop.name} at round {self.step}; checkpoint written, continue with --resume")

    # -- samples and checkpoints -----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, seed: int = 0, use_ema: bool = True) -> torch.Tensor:
        """n student samples from fixed seeds (the same noise at every call)."""
        g = torch.Generator().manual_seed(seed)
        cond, _ = self.sampler.conditions(n, g)
        noise = torch.randn(n, *self.teacher.sample_shape, generator=g).to(self.accelerator.device)
        student = self.trainables["student"]
        # unwrapped: DDP's forward is a collective (buffer broadcast), and only rank 0 samples
        view = Net(unwrap(student.module), self.teacher.denoiser.schedule, adapter=student.adapter)
        with self.ema_weights() if (use_ema and self.ema is not None) else contextlib.nullcontext():
            return few_step_sample(view, noise, cond, self.nets.student_times, g)

    def sample_grid(self, track: bool = False) -> Path | None:
        """The student's sample grid at this round (``<run>/samples``; to the trackers when ``track``)."""
        if not self.accelerator.is_main_process:
            return None
        return self.reporter.sample_grid(self.generate(self.cfg.train.num_sample_images), self.teacher, self.step,
                                         f"{type(self.cfg.objective).__name__} student, round {self.step}", track)

    def save(self) -> Path:
        state = {"step": self.step, "updates": dict(self.updates), "nonfinite_total": dict(self.guard.total),
                 "networks": {n: {"adapter": tr.adapter} for n, tr in self.trainables.items()},
                 "module_order": self.module_names, "objective": to_dict(self.cfg)["objective"]}
        tensors = {"sampler_generator": self.sampler.generator.get_state(), "objective_rng": self.rng.get_state()}
        if self.ema is not None:
            tensors |= {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}
            state["ema_optimization_step"] = int(self.ema.optimization_step)
        return save_checkpoint(self.accelerator, self.run_dir, self.step, state, tensors, self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        """Load the checkpoint ``latest`` names; when it is damaged, the newest complete one before it (and say so)."""
        ckpt, state, tensors, skipped = load_newest(self.accelerator, self.run_dir, self.lora_modules, self.log)
        self.step = int(state["step"])
        self.updates.update(state.get("updates", {}))
        self.guard.total.update(state.get("nonfinite_total", {}))
        self.sampler.generator.set_state(tensors["sampler_generator"])
        self.rng.set_state(tensors["objective_rng"])
        if self.ema is not None:
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(tensors[f"ema.{i}"])
            self.ema.optimization_step = state.get("ema_optimization_step", 0)
        self.log(f"resumed from {ckpt} at round {self.step}" + (f" (skipped {len(skipped)} damaged)" if skipped else ""))


def train(cfg: RunConfig, output_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Build everything from a config and train; returns a summary dict."""
    return Trainer(cfg, Path(output_dir), resume=resume, progress=progress).run()


__all__ = ["Trainer", "NonFiniteError", "train", "training_summary"]
