"""Atomic checkpoints: accelerate state + trainer state, written to a temporary name and renamed.

Layout: ``<run>/checkpoints/step_0000500/`` holds accelerate's ``save_state`` output (model
weights as safetensors, optimizer and scheduler states, RNG states), ``trainer_state.json``
(step, counters, network names in prepare order) and ``extra.safetensors`` (EMA weights,
generator states). ``<run>/checkpoints/latest`` names the newest complete checkpoint; it is
replaced atomically only after the checkpoint folder is complete, so a kill during a save
never leaves a corrupt "latest".

Resume only from your own runs: accelerate stores optimizer and RNG states with pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..contract import StepdistillError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_ASIDE_DIR = re.compile(r"^\.old_step_(\d+)$")  # the previous folder of a same-step re-save, until the new one is in
MARKER = "COMPLETE"  # written last (file names and sizes), deleted first: a folder without it is not a checkpoint


class DamagedCheckpoint(StepdistillError):
    """A checkpoint folder whose marker is missing or whose files differ from what the marker lists."""


def _step(p: Path) -> int:
    return int((_STEP_DIR.match(p.name) or _ASIDE_DIR.match(p.name)).group(1))


def verify_checkpoint(ckpt: Path) -> None:
    """Raise ``DamagedCheckpoint`` unless the marker exists and every file it lists has its recorded size."""
    try:
        listed = json.loads((ckpt / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedCheckpoint(f"checkpoint {ckpt} is incomplete (no readable {MARKER} marker)") from None
    for name, size in listed.items():
        try:
            actual = (ckpt / name).stat().st_size
        except OSError:
            raise DamagedCheckpoint(f"checkpoint {ckpt} lacks {name}") from None
        if actual != size:
            raise DamagedCheckpoint(f"checkpoint {ckpt}: {name} is damaged ({actual} bytes, {size} written)")


def _complete(p: Path) -> bool:
    try:
        verify_checkpoint(p)
        return True
    except DamagedCheckpoint:
        return False


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete, undamaged checkpoints, oldest first (an aside folder stands in for its step while that step is missing)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda q: q.name.startswith(".")):  # step_N before .old_step_N
        if (_STEP_DIR.match(p.name) or _ASIDE_DIR.match(p.name)) and _step(p) not in by_step and _complete(p):
            by_step[_step(p)] = p
    return [by_step[k] for k in sorted(by_step)]


def _pointer(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _STEP_DIR.match(name):
        raise StepdistillError(f"{pointer} must name a step_NNNNNNN folder inside {run_dir / 'checkpoints'}, got {name[:80]!r}; "
                               "delete the file to use the newest complete checkpoint")
    return name


def resume_candidates(run_dir: Path, log=None) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` names, then the others newest first.

    Only folders inside ``<run>/checkpoints`` whose marker and file sizes check out; ``log`` is
    told about each damaged or missing one newer than the first candidate.
    """
    dirs = checkpoint_dirs(run_dir)[::-1]
    name = _pointer(run_dir)
    named = [p for p in dirs if p.name == name]
    cands = named + [p for p in dirs if p not in named]
    if log is not None:
        first = _step(cands[0]) if cands else -1
        root = run_dir / "checkpoints"
        newer = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and _step(p) > first and p not in cands),
                       key=_step, reverse=True) if root.is_dir() else []
        for p in newer:
            try:
                verify_checkpoint(p)
            except DamagedCheckpoint as e:
                log(f"{e}; using {cands[0] if cands else 'no checkpoint'} instead")
        if name and not (root / name).exists() and cands:
            log(f"{root / 'latest'} names {name}, which is missing; using {cands[0]}")
    return cands


def latest_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one (said through ``log``), else None."""
    cands = resume_candidates(run_dir, log)
    return cands[0] if cands else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_marker(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")}
    _write_atomic(folder / MARKER, json.dumps({"files": files}, indent=1))


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its marker first (a half-deleted folder is never taken for a checkpoint)."""
    try:
        (folder / MARKER).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def clean_stale(run_dir: Path) -> None:
    """Remove temporary folders of interrupted saves, and aside folders whose step is back in place."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp_step_") and p.is_dir():
            _remove(p)
        elif _ASIDE_DIR.match(p.name) and _complete(root / f"step_{_step(p):07d}"):
            _remove(p)
        elif _STEP_DIR.match(p.name) and not _complete(p) and _complete(root / f".old_{p.name}"):
            _remove(p)  # a half-written re-save: its aside copy is the checkpoint
    for p in root.iterdir():
        if _ASIDE_DIR.match(p.name) and not (root / f"step_{_step(p):07d}").exists() and _complete(p):
            os.replace(p, root / f"step_{_step(p):07d}")  # a re-save killed between its two renames


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, tensors: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep``. Returns its folder.

    The new folder is complete (marker last) before anything old is touched. A same-step re-save
    renames the old folder aside, renames the new one in, and only then deletes the old one.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    aside = root / f".old_step_{step:07d}"
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_stale(run_dir)
        except OSError as e:
            raise StepdistillError(f"cannot write checkpoints under {root}: {e.strerror or e}") from None
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except OSError as e:  # e.g. disk full: the temporary folder is dropped, the old checkpoints stay
        if accelerator.is_main_process:
            _remove(tmp)
        raise StepdistillError(f"cannot write checkpoint {final}: {e.strerror or e}; the previous checkpoints are intact") from None
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before it is renamed
    if accelerator.is_main_process:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "extra.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            _write_marker(tmp)
        except OSError as e:
            _remove(tmp)
            raise StepdistillError(f"cannot write checkpoint {final}: {e.strerror or e}; the previous checkpoints are intact") from None
        if final.exists():
            _remove(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        if aside.exists():
            _remove(aside)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def trim_lora_weights(accelerator, lora_modules: set[int]) -> None:
    """Save only the adapter weights (``lora_`` keys) of the prepared modules at these indices.

    With LoRA the shared base is the frozen teacher, reloaded from its folder on resume; storing
    it in every checkpoint would cost its full size each time (3.4 GB for SD1.5 in fp32) for
    adapters of a few tens of MB. On load, ``load_checkpoint`` checks that exactly the base
    keys are missing from these files and nothing else.
    """

    def hook(_models, weights, _output_dir):
        for i in lora_modules:
            if i < len(weights):
                weights[i] = {k: v for k, v in weights[i].items() if "lora_" in k}

    accelerator.register_save_state_pre_hook(hook)


def _check_trimmed(accelerator, ckpt: Path, lora_modules: set[int]) -> None:
    """Every saved model file must hold all of its module's keys, or (LoRA bases) all adapter keys."""
    from safetensors import safe_open

    for i, model in enumerate(accelerator._models):
        path = ckpt / f"model{'' if i == 0 else f'_{i}'}.safetensors"
        if not path.is_file():
            raise DamagedCheckpoint(f"checkpoint {ckpt} lacks {path.name}")
        try:
            with safe_open(str(path), "pt") as f:
                saved = set(f.keys())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise DamagedCheckpoint(f"{path} is damaged ({' '.join(str(e).split())[:120]})") from None
        keys = set(model.state_dict())  # what accelerate saves: the prepared module's own keys
        expected = {k for k in keys if "lora_" in k} if i in lora_modules else keys
        missing, extra = expected - saved, saved - keys
        if missing or extra:
            key = next(iter(missing or extra))
            raise StepdistillError(f"checkpoint {path} does not match the run's networks ({len(missing)} missing, "
                                   f"{len(extra)} unexpected keys, e.g. {key!r}); resume with the run's own config")


def load_checkpoint(accelerator, ckpt: Path, lora_modules: set[int] = frozenset()) -> tuple[dict, dict]:
    """Restore accelerate state from ``ckpt``; return (trainer_state, extra tensors).

    ``lora_modules``: indices of prepared modules saved trimmed to their adapter weights.
    """
    verify_checkpoint(ckpt)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is unreadable ({e})") from None
    _check_trimmed(accelerator, ckpt, set(lora_modules))
    try:
        accelerator.load_state(str(ckpt), strict=False)  # checked above: only the frozen LoRA base keys are absent
        return state, load_file(str(ckpt / "extra.safetensors"))
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def read_student_weights(ckpt: Path, needed: list[str]) -> tuple[dict, dict, list | None]:
    """(trainer state, the student module's saved weights, EMA weights or None) from one checkpoint.

    ``needed``: the keys the student must find (a LoRA student: its adapter keys only).
    """
    verify_checkpoint(ckpt)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {ckpt} is unreadable ({e})") from None
    order = state.get("module_order", []) if isinstance(state, dict) else []
    idx = next((i for i, names in enumerate(order) if "student" in names.split("+")), None)
    if idx is None:
        raise StepdistillError(f"checkpoint {ckpt} has no student network (module_order {order})")
    weights = ckpt / f"model{'' if idx == 0 else f'_{idx}'}.safetensors"
    saved = load_file(str(weights))
    missing = [k for k in needed if k not in saved]
    if missing:
        raise StepdistillError(f"{weights} lacks {len(missing)} student weights (e.g. {missing[0]!r}); was it written by this run?")
    extra = load_file(str(ckpt / "extra.safetensors")) if (ckpt / "extra.safetensors").is_file() else {}
    ema = [extra[f"ema.{i}"] for i in range(len([k for k in extra if k.startswith("ema.")]))] if "ema.0" in extra else None
    return state, saved, ema


def load_newest(accelerator, run_dir: Path, lora_modules, log) -> tuple[Path, dict, dict, list[str]]:
    """Load the checkpoint ``latest`` names; when it is damaged, the newest complete one before it (and say so).

    Returns (checkpoint, trainer state, extra tensors, the damage messages of those skipped).
    """
    skipped = []
    for ckpt in resume_candidates(run_dir, log):
        try:
            state, tensors = load_checkpoint(accelerator, ckpt, lora_modules)
            return ckpt, state, tensors, skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
            log(f"{e}; trying an older checkpoint")
    raise StepdistillError(f"no loadable checkpoint in {run_dir / 'checkpoints'}{': ' + skipped[0] if skipped else ''}")
