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


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        target = run_dir / "checkpoints" / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, tensors: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep``. Returns its folder."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before it is renamed
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "extra.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
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
            raise StepdistillError(f"checkpoint {ckpt} lacks {path.name}; it was written by a different run layout")
        with safe_open(str(path), "pt") as f:
            saved = set(f.keys())
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
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepdistillError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an older one") from None
    _check_trimmed(accelerator, ckpt, set(lora_modules))
    accelerator.load_state(str(ckpt), strict=False)  # checked above: only the frozen LoRA base keys are absent
    return state, load_file(str(ckpt / "extra.safetensors"))


def read_student_weights(ckpt: Path, needed: list[str]) -> tuple[dict, dict, list | None]:
    """(trainer state, the student module's saved weights, EMA weights or None) from one checkpoint.

    ``needed``: the keys the student must find (a LoRA student: its adapter keys only).
    """
    state = json.loads((ckpt / "trainer_state.json").read_text())
    order = state.get("module_order", [])
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
