"""The one training loop (accelerate). It owns everything that is not the math.

Per round, each phase of the objective runs its number of updates (e.g. 5 critic updates,
then 1 student update). Per update: gradient isolation (only the phase's networks require
grad), ``grad_accum`` micro-batches, a non-finite guard on loss and gradients, clipping, the
optimizer and LR-scheduler step, and the student EMA. The frozen teacher is never prepared.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import RunConfig, save_config, to_dict
from ..contract import StepdistillError
from ..sampling import few_step_sample
from ..viz import save_samples
from .checkpoint import DamagedCheckpoint, latest_checkpoint, load_checkpoint, resume_candidates, save_checkpoint, trim_lora_weights
from .data import BatchSampler, load_real
from .networks import Net, unwrap
from .run import Trainable, build_run, swapped


LR_SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts", "polynomial")  # diffusers.optimization names


def _optimizer(tr: Trainable, total_updates: int):
    """AdamW plus ``diffusers.optimization.get_scheduler`` (linear warm-up from 0, stepped once per update)."""
    from diffusers.optimization import get_scheduler

    cfg = tr.cfg
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise StepdistillError(f"{tr.name}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    opt = torch.optim.AdamW(tr.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warm = max(0, cfg.warmup_steps)
    name = "constant_with_warmup" if (cfg.lr_schedule == "constant" and warm) else cfg.lr_schedule
    return opt, get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=max(1, total_updates))


# -------------------------------------------------------------------------------------- trainer


def _fsdp_kwargs(cfg: RunConfig) -> dict:
    """FSDP2 for the trained full networks (``train.distributed=fsdp``); the teacher stays unsharded.

    Limits: LoRA views on one shared base cannot be sharded per network (the base belongs to
    all three), so fsdp needs full-copy networks; each trained network is wrapped on its own.
    DeepSpeed is not offered: one engine per model, and DMD-style runs train two.
    """
    mode = cfg.train.distributed
    if mode not in ("ddp", "fsdp"):
        raise StepdistillError(f"train.distributed must be ddp or fsdp, got {mode!r}")
    if mode == "ddp":
        return {}
    if "lora" in (cfg.student.init, cfg.fake_score.init):
        raise StepdistillError("train.distributed=fsdp needs full-copy networks (student.init=copy, fake_score.init=copy); "
                               "LoRA adapters share the teacher's base: use ddp")
    from accelerate.utils import FullyShardedDataParallelPlugin

    return {"fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                          state_dict_type="SHARDED_STATE_DICT")}


def _trackers(report_to: str) -> list[str]:
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


class NonFiniteError(StepdistillError):
    pass


def _reset_single_process_accelerate_state() -> None:
    """accelerate keeps one process-wide state; outside a distributed launch, start it afresh."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


class Trainer:
    """Runs an objective over its networks; see the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        tc = cfg.train
        if tc.mixed_precision not in ("no", "bf16", "fp16"):
            raise StepdistillError(f"train.mixed_precision must be no, bf16 or fp16, got {tc.mixed_precision!r}")
        if tc.mixed_precision == "fp16" and (tc.cpu or not torch.cuda.is_available()):
            raise StepdistillError("train.mixed_precision=fp16 needs a CUDA device (on CPU it would silently train in fp32); "
                                   "use train.mixed_precision=bf16 or no")
        _reset_single_process_accelerate_state()  # a second run in one process may use another precision
        from accelerate.utils import DistributedDataParallelKwargs

        # LoRA views share one DDP-wrapped base, and each phase uses only its own adapter
        uses_lora = "lora" in (cfg.student.init, cfg.fake_score.init)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=uses_lora)
        self.accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu or not torch.cuda.is_available(),
                                       kwargs_handlers=[ddp], log_with=_trackers(tc.report_to) or None,
                                       project_dir=str(self.run_dir), **_fsdp_kwargs(cfg))
        if tc.distributed == "fsdp" and "FSDP" not in str(self.accelerator.distributed_type):
            self.log(f"train.distributed=fsdp: accelerate runs {self.accelerator.distributed_type.value} here (FSDP needs "
                     "CUDA devices); training unsharded")
        self._lock = None
        try:
            self._lock_run_dir()
            self._setup(resume)
        except BaseException:
            self.release()
            raise

    def _setup(self, resume: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self._check_run_dir(resume)
        from accelerate.utils import set_seed

        set_seed(tc.seed)  # network initialisation (e.g. the MLP denoisers) is seeded too
        self.objective = cfg.objective
        run = build_run(cfg, self.device, self.log, fit=not resume)
        self.run_parts, self.teacher, self.trainables = run, run.teacher, run.trainables
        self._memory_levers()
        self._prepare()
        self.nets = run.views()  # over the prepared modules
        rank = self.accelerator.process_index
        real = load_real(cfg.data.real, self.teacher, self.teacher.sample_shape)
        self.sampler = BatchSampler(self.teacher.conditioner, self.teacher.sample_shape, tc.batch_size,
                                    tc.seed * 1000 + rank + 1, self.device, real)
        self.rng = torch.Generator().manual_seed(tc.seed * 1000 + rank + 500_000)
        self.ema = self._make_ema()
        self.nets.ema_weights = None if self.ema is None else self.ema_weights()
        if self.ema is not None:
            sc = cfg.student
            self.log(f"student EMA (evaluated and exported): decay up to {sc.ema_decay}" +
                     (f", SiD ramp: half-life {sc.ema_rampup} x images seen" if sc.ema_rampup > 0 else ""))
        # non-finite updates in a row, per phase: one phase's success must not hide another that always fails
        self.step, self.nonfinite_total, self.nonfinite_in_row = 0, defaultdict(int), defaultdict(int)
        self.updates = defaultdict(int)
        self._stop_signal = None
        if resume:
            self._resume()

    # -- setup ---------------------------------------------------------------------------------

    @property
    def device(self):
        return self.accelerator.device

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(msg)

    def _lock_run_dir(self) -> None:
        """One writer per run folder: an exclusive ``flock`` on ``<run>/.lock`` (main process), held until ``release``."""
        if not self.accelerator.is_main_process:
            return
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.run_dir / ".lock", "a+")
        except OSError as e:
            raise StepdistillError(f"cannot use {self.run_dir} as the run folder: {e.strerror or e}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StepdistillError(f"{self.run_dir} is in use by another training process (it holds {self.run_dir / '.lock'}); "
                                   "wait for it to finish or choose another --output-dir") from None
        self._lock = lock

    def release(self) -> None:
        """Give up the run-folder lock (``run`` does this when it returns or fails)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()

    def _check_run_dir(self, resume: bool) -> None:
        has_run = latest_checkpoint(self.run_dir) is not None
        if has_run and not resume:
            raise StepdistillError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")
        if resume and not has_run:
            raise StepdistillError(f"nothing to resume in {self.run_dir}: no complete checkpoint under checkpoints/")
        if resume and (self.run_dir / "config.yaml").is_file():
            import yaml

            try:
                saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                saved = None
            if not isinstance(saved, dict):
                raise StepdistillError(f"{self.run_dir}/config.yaml is unreadable; it is not the config this run was written with")
            now, old = _flat(to_dict(self.cfg)), _flat(saved)
            diff = [k for k in sorted(set(now) | set(old)) if k != "train.steps" and now.get(k, _MISSING) != old.get(k, _MISSING)]
            if diff:
                raise StepdistillError(f"resume with the run's own config: {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''} "
                                       f"differ from {self.run_dir}/config.yaml (only train.steps may grow)")
            if isinstance(old.get("train.steps"), int) and self.cfg.train.steps < old["train.steps"]:
                raise StepdistillError(f"train.steps={self.cfg.train.steps} is below the run's {old['train.steps']}; "
                                       "on resume train.steps may only grow")

    def _memory_levers(self) -> None:
        """Attention backend, gradient checkpointing of the trained networks, teacher CPU offload."""
        from .memory import enable_gradient_checkpointing, offload_teacher, set_attention_backend

        modules = {id(tr.module): tr.module for tr in self.trainables.values()} | {id(self.teacher.denoiser): self.teacher.denoiser}
        backend = {set_attention_backend(m, self.cfg.train.attention, self.device) for m in modules.values()} - {None}
        if backend:
            self.log(f"attention: {', '.join(sorted(backend))}")
        if self.cfg.train.gradient_checkpointing:
            done = [n for n, tr in self.trainables.items() if n in ("student", "fake_score") and enable_gradient_checkpointing(tr.module)]
            self.log(f"gradient checkpointing on: {', '.join(done) or 'none (no diffusers network to checkpoint)'}")
        if self.cfg.teacher.offload:
            if any(tr.adapter for tr in self.trainables.values()):
                raise StepdistillError("teacher.offload=true needs full-copy networks: with LoRA the teacher's base is the trained networks' base")
            self.log(offload_teacher(self.teacher.denoiser, self.device))

    def _prepare(self) -> None:
        """Optimizers per network; prepare each owning module once (the teacher never)."""
        modules, seen = [], {}
        for tr in self.trainables.values():
            per_round = sum(c for p, c in self.objective.phases.items() if tr.name in self.objective.phase_updates(p))
            tr.optimizer, tr.scheduler = _optimizer(tr, per_round * self.cfg.train.steps)
            if id(tr.module) not in seen:
                seen[id(tr.module)] = len(modules)
                modules.append(tr.module)
        opts = [tr.optimizer for tr in self.trainables.values()]
        scheds = [tr.scheduler for tr in self.trainables.values()]
        prepared = self.accelerator.prepare(*modules, *opts, *scheds)
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        pm, po, ps = prepared[: len(modules)], prepared[len(modules): len(modules) + len(opts)], prepared[len(modules) + len(opts):]
        for tr, opt, sch in zip(self.trainables.values(), po, ps):
            tr.module, tr.optimizer, tr.scheduler = pm[seen[id(tr.module)]], opt, sch
        owners = {}
        for name, tr in self.trainables.items():
            owners.setdefault(id(tr.module), "+".join(n for n, t in self.trainables.items() if t.module is tr.module))
        self.module_names = list(owners.values())  # accelerate's model, model_1, ... in this order
        # LoRA bases: checkpoint only the adapters (the base is the frozen teacher, reloaded on resume)
        self.lora_modules = {i for i, names in enumerate(self.module_names)
                             if any(self.trainables[n].adapter for n in names.split("+"))}
        trim_lora_weights(self.accelerator, self.lora_modules)

    def _make_ema(self):
        """diffusers' ``EMAModel`` over the student. With ``student.ema_rampup`` r > 0 it ramps as SiD's
        EMA (half-life min(H, r x images seen)): EMAModel's warm-up decay 1 - (1 + n/g)^-1 with power 1
        and inv_gamma g = ln 2 / r has half-life ~ r n updates, i.e. r x the images seen, whatever the
        batch; ``ema_decay`` caps it (H). r = 0: EMAModel's plain (1+n)/(10+n) warm-up up to ema_decay."""
        sc = self.cfg.student
        if not sc.ema_decay or "student" not in self.trainables:
            return None
        from diffusers.training_utils import EMAModel

        ramp = dict(use_ema_warmup=True, power=1.0, inv_gamma=math.log(2) / sc.ema_rampup) if sc.ema_rampup > 0 else \
            dict(use_ema_warmup=False)
        return EMAModel(self.trainables["student"].params, decay=sc.ema_decay, foreach=False, **ramp)

    def ema_weights(self):
        """A context in which the student's parameters hold their EMA."""
        return swapped(self.trainables["student"].params, self.ema.shadow_params)

    # -- one update ------------------------------------------------------------------------------

    def _set_trainable(self, names: tuple[str, ...]) -> None:
        """Gradient isolation: only the phase's networks require grad."""
        for name, tr in self.trainables.items():
            for p in tr.params:
                p.requires_grad_(name in names)

    def update(self, phase: str) -> dict[str, float]:
        names = tuple(self.objective.phase_updates(phase))
        unknown = [n for n in names if n not in self.trainables]
        if unknown:
            raise StepdistillError(f"objective phase {phase!r} updates {unknown}, which this run does not train")
        self._set_trainable(names)
        group = [self.trainables[n] for n in names]
        for tr in group:
            tr.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = defaultdict(float)
        accum = self.cfg.train.grad_accum
        for _ in range(accum):
            batch = self.sampler.next()
            with self.accelerator.autocast():
                out = self.objective.loss(phase, self.nets, batch, self.rng)
            if not torch.isfinite(out.loss):
                return self._nonfinite(phase, names, "loss", group)
            self.accelerator.backward(out.loss / accum)
            logs["loss"] += out.loss.item() / accum
            for k, v in out.logs.items():
                logs[k] += v / accum
        for tr in group:
            norm = self._clip(tr)
            if not math.isfinite(norm):
                return self._nonfinite(phase, names, f"gradient of {tr.name}", group)
            logs[f"grad_norm_{tr.name}"] = norm
        for tr in group:
            tr.optimizer.step()
            tr.scheduler.step()
            self.updates[tr.name] += 1
            if tr.name == "student" and self.ema is not None:
                self.ema.step(tr.params)
        self.nonfinite_in_row[phase] = 0
        return {f"{phase}/{k}": v for k, v in logs.items()}

    def _clip(self, tr: Trainable) -> float:
        params = [p for p in tr.params if p.grad is not None]
        if not params:
            return 0.0
        clip = tr.cfg.grad_clip if tr.cfg.grad_clip > 0 else float("inf")
        return float(self.accelerator.clip_grad_norm_(params, clip))

    def _nonfinite(self, phase, names, what, group) -> dict[str, float]:
        for tr in group:
            tr.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total[phase] += 1
        self.nonfinite_in_row[phase] += 1
        in_row = self.nonfinite_in_row[phase]
        self.log(f"step {self.step}: non-finite {what} in phase {phase!r}; update skipped "
                 f"({in_row} in a row, {self.nonfinite_total[phase]} in this phase)")
        if in_row >= self.cfg.train.max_nonfinite:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteError(
                f"stopping: {in_row} non-finite updates in a row (last: {what} in phase {phase!r}, "
                f"network {'/'.join(names)}); last good checkpoint: {last or 'none'}. Lower the learning rate or "
                "check the teacher and data."
            )
        return {f"{phase}/nonfinite": 1.0}

    # -- the loop --------------------------------------------------------------------------------

    def run(self, until: int | None = None) -> dict:
        """Train to ``train.steps`` rounds (or stop early after round ``until``, with a checkpoint)."""
        tc = self.cfg.train
        last = tc.steps if until is None else min(until, tc.steps)
        if self._lock is None:
            self._lock_run_dir()  # a second run() of this trainer (the first released the folder)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.run_dir / "config.yaml")
        tracking = self._init_trackers()
        self._install_signal_handlers()
        from tqdm import tqdm

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
                if self.step % tc.log_every == 0 or self.step == last:
                    self._log_metrics(window, bar, time.time() - start)
                    window.clear()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.sample_grid(track=tracking)
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    if any(self.nonfinite_in_row.values()):  # mid-streak: keep the last good checkpoints as they are
                        self.log(f"round {self.step}: checkpoint skipped during a run of non-finite updates")
                    else:
                        self.save()
                if self._stop_agreed():
                    self.save()
                    raise StepdistillError(f"stopped by {self._stop_signal} at round {self.step}; checkpoint written, "
                                           "continue with --resume")
            final = self.sample_grid(track=False)
            ckpt = self.save()
        finally:
            self._restore_signal_handlers()
            bar.close()
            if tracking:
                self.accelerator.end_training()  # closes the trackers (tensorboard: flushes the event file)
            self.release()
        return {"run_dir": str(self.run_dir), "steps": self.step, "checkpoint": str(ckpt), "samples": str(final),
                "nonfinite": dict(self.nonfinite_total), "seconds": round(time.time() - start, 1)}

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal this round (one all-reduce per round under DDP), so all stop together."""
        if self.accelerator.num_processes == 1:
            return bool(self._stop_signal)
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if stop and not self._stop_signal:
            self._stop_signal = "a stop signal on another rank"
        return stop

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the round, write a checkpoint, stop. A second SIGINT kills at once."""

        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name
            self.log(f"{self._stop_signal}: writing a checkpoint at the end of this round (Ctrl-C again to abort)")
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass

    def _restore_signal_handlers(self) -> None:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:
            pass

    def _init_trackers(self) -> bool:
        """accelerate's trackers under ``<run>``; tensorboard writes ``<run>/tensorboard`` (a resume purges later events)."""
        if not self.accelerator.log_with:
            return False
        self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": self.step or None}})
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":  # tensorboard's hparams would add a folder; config.yaml holds the config
                tracker.store_init_configuration(_flat(to_dict(self.cfg)))
        return True

    def _log_metrics(self, window, bar, elapsed: float) -> None:
        means = {k: sum(v) / len(v) for k, v in window.items() if v}
        means |= {f"lr/{n}": tr.scheduler.get_last_lr()[0] for n, tr in self.trainables.items()}
        record = {"step": self.step, "elapsed_s": round(elapsed, 2)} | {k: round(v, 6) for k, v in means.items()}
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(means, step=self.step)
        bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.endswith("/loss")}, refresh=False)
        keys = sorted(k for k in means if k.endswith("loss") or "grad_norm" in k)
        self.log(f"round {self.step}/{self.cfg.train.steps} " + " ".join(f"{k}={means[k]:.4g}" for k in keys))

    # -- samples and checkpoints -----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, n: int, seed: int = 0, use_ema: bool = True) -> torch.Tensor:
        """n student samples from fixed seeds (the same noise at every call)."""
        g = torch.Generator().manual_seed(seed)
        cond, _ = self.sampler.conditions(n, g)
        noise = torch.randn(n, *self.teacher.sample_shape, generator=g).to(self.device)
        student = self.trainables["student"]
        # unwrapped: DDP's forward is a collective (buffer broadcast), and only rank 0 samples
        view = Net(unwrap(student.module), self.teacher.denoiser.schedule, adapter=student.adapter)
        ctx = self.ema_weights() if (use_ema and self.ema is not None) else contextlib.nullcontext()
        with ctx:
            x = few_step_sample(view, noise, cond, self.nets.student_times, g)
        return x

    def sample_grid(self, track: bool = False) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        x = self.generate(self.cfg.train.num_sample_images)
        if self.teacher.decode is not None:
            x = self.teacher.decode(x)
        ref = None
        if self.teacher.sample_data is not None and x.ndim == 2:
            g = torch.Generator().manual_seed(1)
            ref = self.teacher.sample_data(1000, g, self.teacher.conditioner(1000, g)[0])
        path = save_samples(x.cpu(), self.run_dir / "samples" / f"step_{self.step:07d}.png", ref,
                            title=f"{type(self.objective).__name__} student, round {self.step}")
        if track and x.ndim == 4:
            self._log_images((x.float().clamp(-1, 1) * 0.5 + 0.5)[:, :3].cpu())  # [N, C, H, W] in [0, 1]
        return path

    def _log_images(self, images: torch.Tensor) -> None:
        """The sample grid to every tracker that takes images (tensorboard: NCHW; others: HWC uint8 arrays)."""
        arrays = [(im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for im in images]
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"samples": images if tracker.name == "tensorboard" else arrays}, step=self.step)

    def save(self) -> Path:
        state = {"step": self.step, "updates": dict(self.updates), "nonfinite_total": dict(self.nonfinite_total),
                 "networks": {n: {"adapter": tr.adapter} for n, tr in self.trainables.items()},
                 "module_order": self.module_names, "objective": to_dict(self.cfg)["objective"]}
        tensors = {"sampler_generator": self.sampler.generator.get_state(), "objective_rng": self.rng.get_state()}
        if self.ema is not None:
            tensors |= {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}
            state["ema_optimization_step"] = int(self.ema.optimization_step)
        return save_checkpoint(self.accelerator, self.run_dir, self.step, state, tensors, self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        """Load the checkpoint ``latest`` names; when it is damaged, the newest complete one before it (and say so)."""
        skipped = []
        for ckpt in resume_candidates(self.run_dir, self.log):
            try:
                state, tensors = load_checkpoint(self.accelerator, ckpt, self.lora_modules)
                break
            except DamagedCheckpoint as e:
                skipped.append(str(e))
                self.log(f"{e}; trying an older checkpoint")
        else:
            raise StepdistillError(f"no loadable checkpoint in {self.run_dir / 'checkpoints'}"
                                   f"{': ' + skipped[0] if skipped else ''}")
        self.step = int(state["step"])
        self.updates.update(state.get("updates", {}))
        self.nonfinite_total.update(state.get("nonfinite_total", {}))
        self.sampler.generator.set_state(tensors["sampler_generator"])
        self.rng.set_state(tensors["objective_rng"])
        if self.ema is not None:
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(tensors[f"ema.{i}"])
            self.ema.optimization_step = state.get("ema_optimization_step", 0)
        self.log(f"resumed from {ckpt} at round {self.step}" + (f" (skipped {len(skipped)} damaged)" if skipped else ""))


_MISSING = object()


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}`` (lists compared whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: list(v) if isinstance(v, tuple) else v}
    return out


def training_summary(run_dir: str | Path) -> dict | None:
    """Rounds and wall-clock seconds of a run, from its ``metrics.jsonl`` (resumed segments summed).

    Each process start logs ``elapsed_s`` from zero, so a drop marks a resume; the last value of
    every segment is added. ``None`` when the run logged nothing.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds, last, rounds = 0.0, 0.0, 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        elapsed = float(rec.get("elapsed_s", 0.0))
        if elapsed < last:
            seconds += last
        last, rounds = elapsed, int(rec.get("step", rounds))
    return {"rounds": rounds, "seconds": round(seconds + last, 1)}


def train(cfg: RunConfig, output_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Build everything from a config and train; returns a summary dict."""
    return Trainer(cfg, Path(output_dir), resume=resume, progress=progress).run()


__all__ = ["Trainer", "train", "training_summary"]
