"""The run folder: one writer at a time (a lock), resume checks against its ``config.yaml``, and
the training time its ``metrics.jsonl`` records."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig, to_dict
from ..contract import StepdistillError
from .checkpoint import latest_checkpoint

_MISSING = object()
# bookkeeping that never touches the weights: a resume may change it (train.steps may only grow)
RESUME_FREE = ("train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.num_sample_images", "train.compile")


class RunFolderLock:
    """One writer per run folder: an exclusive ``flock`` on ``<run>/.lock``, held until ``release``."""

    def __init__(self, run_dir: Path):
        self.run_dir, self._file = Path(run_dir), None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
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
        self._file = lock

    def release(self) -> None:
        lock, self._file = self._file, None
        if lock is not None:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()


def flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}`` (lists compared whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= flat(v, key + ".") if isinstance(v, dict) else {key: list(v) if isinstance(v, tuple) else v}
    return out


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    """A new run needs an empty folder; a resume needs a checkpoint and the run's own config (steps may grow)."""
    has_run = latest_checkpoint(run_dir) is not None
    if has_run and not resume:
        raise StepdistillError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")
    if resume and not has_run:
        raise StepdistillError(f"nothing to resume in {run_dir}: no complete checkpoint under checkpoints/")


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """A resume runs the run's own config (after teacher-derived settings, e.g. CFG off on a teacher
    without a null class, are applied): only ``train.steps`` may differ, and only upwards, and the
    bookkeeping in ``RESUME_FREE`` (log, sample-grid and checkpoint intervals)."""
    if not (run_dir / "config.yaml").is_file():
        return
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise StepdistillError(f"{run_dir}/config.yaml is unreadable; it is not the config this run was written with")
    now, old, default = flat(to_dict(cfg)), flat(saved), _defaults(cfg)
    # a key the saved config lacks was added by a later stepdistill; at its default it keeps the old behaviour
    diff = [k for k in sorted(set(now) | set(old)) if k not in RESUME_FREE and now.get(k, _MISSING) != old.get(k, _MISSING)
            and not (k not in old and now[k] == default.get(k, _MISSING))]
    if diff:
        raise StepdistillError(f"resume with the run's own config: {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''} "
                               f"differ from {run_dir}/config.yaml (only train.steps may grow, and logging, sample and "
                               "checkpoint intervals change)")
    if isinstance(old.get("train.steps"), int) and cfg.train.steps < old["train.steps"]:
        raise StepdistillError(f"train.steps={cfg.train.steps} is below the run's {old['train.steps']}; "
                               "on resume train.steps may only grow")


def _defaults(cfg: RunConfig) -> dict:
    """The flat default config for this run's objective (``{}`` if its settings have no defaults)."""
    try:
        return flat(to_dict(RunConfig(objective=type(cfg.objective)())))
    except TypeError:
        return {}


def seconds_by_round(run_dir: str | Path) -> dict[int, float]:
    """Logged round -> wall-clock training seconds so far, from the run's ``metrics.jsonl``.

    Each process start logs ``elapsed_s`` from zero, so a drop marks a resume and the previous
    segment's last value is carried over. ``{}`` when the run logged nothing.
    """
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.is_file():
        return out
    offset, last = 0.0, 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "elapsed_s" not in rec or "step" not in rec:
            continue
        elapsed = float(rec["elapsed_s"])
        if elapsed < last:
            offset += last
        last = elapsed
        out[int(rec["step"])] = offset + elapsed
    return out


def training_summary(run_dir: str | Path, upto: int | None = None) -> dict | None:
    """Rounds and wall-clock seconds of a run (resumed segments summed; ``seconds_by_round``), or of its
    first ``upto`` rounds (the last logged round at or below it: a checkpoint's step). ``None`` when
    the run logged nothing."""
    by_round = {r: sec for r, sec in seconds_by_round(run_dir).items() if upto is None or r <= upto}
    if not by_round:
        return None
    rounds = list(by_round)[-1]
    return {"rounds": rounds, "seconds": round(by_round[rounds], 1)}
