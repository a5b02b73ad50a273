"""Teacher families: ONE registered record per diffusers family.

A family record is everything the toolkit knows about one kind of diffusers model, so adding a
family is one file here (plus its tests):

| member                 | what it answers                                                         |
|------------------------|-------------------------------------------------------------------------|
| ``network_classes``    | the denoiser classes it claims (``UNet2DConditionModel``, ...)          |
| ``pipeline_classes``   | the ``model_index.json`` pipelines it claims (checked first)            |
| ``subfolder``          | where the denoiser lives in a pipeline folder (``unet`` / ``transformer``) |
| ``call``               | how to call the network: (model, x_t, native timestep, cond) -> output  |
| ``native_timestep``    | continuous t -> the network's own timestep input                        |
| ``conditioner``        | conditions for training, encoded with the family pipeline's own         |
|                        | ``encode_prompt`` (so training and stock inference see the same embeds)  |
| ``latent_codec``       | the VAE named in ``model_index.json``: encode images, decode latents    |
| ``sample_shape``       | the shape of one (latent) sample the denoiser works on                  |
| ``lora_targets``       | the modules LoRA adapts by default (``lora_loader``: export --lora)      |
| ``feature_layers``     | the layers a discriminator head reads                                   |
| ``dummy_cond``         | meta-device conditions for ``stepdistill plan``                         |
| ``export``             | the stock pipeline folder a student becomes                             |

Families are registered with ``@register_family`` (one line each, duplicates rejected) and
found from a folder (``family_for_folder``) or a network (``family_for_model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...contract import StepdistillError

LORA_TARGETS = (  # LCM-LoRA's UNet set plus the usual transformer projections
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def need(cond, key: str, family: str) -> Tensor:
    """cond[key], or a one-line error naming the family and the keys it got."""
    if key not in cond or cond[key] is None:
        raise StepdistillError(f"the {family} adapter needs cond[{key!r}]; got keys {sorted(cond)}")
    return cond[key]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise StepdistillError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise StepdistillError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def config_of(model_or_config) -> dict:
    """A network's config as a dict ({} for a module without one)."""
    if isinstance(model_or_config, dict):
        return model_or_config
    return dict(getattr(model_or_config, "config", None) or {})


@dataclass
class LatentCodec:
    """A family's VAE: images in [-1, 1] <-> normalised latents (``scaling_factor``, ``shift_factor``)."""

    vae: nn.Module
    scale: float
    shift: float = 0.0

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        vae = self.vae.to(images.device)
        out = vae.encode(images.to(next(vae.parameters()).dtype))
        z = out.latent_dist.sample(generator) if hasattr(out, "latent_dist") else out.latent  # KL VAE / AutoencoderDC
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae.to(latents.device)
        z = latents.float() / self.scale + self.shift
        return vae.decode(z.to(next(vae.parameters()).dtype)).sample.float().clamp(-1, 1)


@dataclass
class ExportJob:
    """What a family's ``export`` writes from: the trained student and where it came from."""

    teacher: object  # stepdistill.teachers.Teacher
    model: nn.Module  # the student network, LoRA merged, in the export dtype
    times: dict[int, list[float]]  # step count -> continuous student times
    out: Path
    dtype: str = "fp32"
    lora_state: dict | None = None  # peft-format adapter weights (``<module>.lora_A.weight``) for --lora
    lora_config: dict = field(default_factory=dict)  # r, lora_alpha, target_modules


class Family:
    """Defaults shared by every family; each family file overrides what differs."""

    name: str = ""
    network_classes: tuple[str, ...] = ()
    pipeline_classes: tuple[str, ...] = ()
    subfolder: str = "unet"
    text: bool = False  # conditioned on prompts
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_loader: bool = True  # the family pipeline has diffusers' load_lora_weights (export --lora)

    # -- the network -----------------------------------------------------------------------------

    def claims(self, model_or_config) -> bool:
        """Does this family own the network (instance or config dict)?"""
        config = config_of(model_or_config)
        names = {config.get("_class_name", "")}
        if not isinstance(model_or_config, dict):
            names |= {c.__name__ for c in type(model_or_config).__mro__}
        return bool(names & set(self.network_classes))

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: dict) -> Tensor:
        raise NotImplementedError(f"family {self.name!r} does not define how its network is called")

    def native_timestep(self, schedule, t: Tensor) -> Tensor:
        """The network's own timestep input for continuous t [B] (fractional steps allowed)."""
        return schedule.to_native(t)

    def sample_shape(self, config: dict, codec: LatentCodec | None) -> tuple[int, ...]:
        size = config.get("sample_size", 16)
        size = size if isinstance(size, int) else size[0]
        return (int(config.get("in_channels", 4)), int(size), int(size))

    def feature_layers(self, model: nn.Module) -> list[str]:
        from ..capture import default_feature_layers

        return default_feature_layers(model)

    # -- conditions -----------------------------------------------------------------------------

    def conditioner(self, folder: Path, model: nn.Module, meta: dict, prompts: list[str] | None):
        """(conditioner, number of classes) for training on this teacher."""
        from ...conditioning import Unconditional

        return Unconditional(), 0

    def dummy_cond(self, config: dict, batch: int) -> dict:
        """Conditions of the right shapes for one forward (``stepdistill plan``, on meta)."""
        return {}

    # -- latents --------------------------------------------------------------------------------

    def latent_codec(self, folder: Path) -> LatentCodec | None:
        """The VAE ``model_index.json`` names (``AutoencoderKL`` if it names none), or None without ``vae/``."""
        if not (folder / "vae" / "config.json").is_file():
            return None
        import diffusers

        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        cls_name = (index.get("vae") or [None, None])[1] or read_json(folder / "vae" / "config.json").get("_class_name") or "AutoencoderKL"
        cls = getattr(diffusers, str(cls_name), None)
        if cls is None:
            raise StepdistillError(f"{folder}/model_index.json names VAE class {cls_name!r}, which diffusers does not have")
        vae = cls.from_pretrained(folder / "vae", use_safetensors=True).eval().requires_grad_(False)
        shift = vae.config.get("shift_factor") or 0.0
        return LatentCodec(vae, float(vae.config.get("scaling_factor") or 1.0), float(shift))

    # -- export ---------------------------------------------------------------------------------

    def export(self, job: ExportJob) -> dict:
        raise StepdistillError(f"export of {self.name} students is not supported yet")


_REGISTRY: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register one family record under ``cls.name`` (duplicates rejected)."""
    if not cls.name or cls.name in _REGISTRY:
        raise StepdistillError(f"family {cls.name!r} is unnamed or registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def families() -> dict[str, Family]:
    """Every registered family by name."""
    _load_builtin()
    return dict(_REGISTRY)


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise StepdistillError(f"unknown family {name!r}; registered: {', '.join(sorted(fams))}")
    return fams[name]


def family_for_model(model_or_config) -> Family:
    """The family that owns a network (instance or config dict). Most specific first (SDXL before SD)."""
    fams = families()
    for fam in fams.values():
        if fam.claims(model_or_config):
            return fam
    name = model_or_config.get("_class_name") if isinstance(model_or_config, dict) else type(model_or_config).__name__
    supported = sorted({c for f in fams.values() for c in f.network_classes})
    raise StepdistillError(f"no adapter for {name}; supported: {', '.join(supported)}")


def family_for_folder(folder: Path, network_config: dict) -> Family:
    """The family of a teacher folder: its ``model_index.json`` pipeline first, then the network class."""
    fams = families()
    if (folder / "model_index.json").is_file():
        pipeline = read_json(folder / "model_index.json").get("_class_name")
        for fam in fams.values():
            if pipeline in fam.pipeline_classes and fam.claims(network_config):
                return fam
    return family_for_model(network_config)


_BUILTIN = ("class_conditional", "sd", "sdxl", "sd3", "flux", "sana", "pixart")


def _load_builtin() -> None:
    import importlib

    for module in _BUILTIN:  # each registers itself on first import
        importlib.import_module(f"{__name__}.{module}")


__all__ = ["Family", "ExportJob", "LatentCodec", "LORA_TARGETS", "register_family", "families", "get_family",
           "family_for_model", "family_for_folder", "need", "read_json", "config_of"]
