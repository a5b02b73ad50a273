"""Typed run configuration: dataclasses, YAML recipes, dotted overrides.

A recipe is YAML over ``RunConfig``; ``objective`` is the registered objective's own dataclass
(its fields are its hyperparameters). An override of ``objective.name`` to another objective
starts that section afresh (the recipe's hyperparameters belonged to the old objective). Unknown keys fail with the nearest valid key suggested.
Values are checked where they are used; builders turn config into plain keyword arguments.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .contract import StepdistillError
from .validation import check_choice, check_finite, check_range  # noqa: F401  (re-exported: config.check_range)


@dataclass
class TeacherConfig:
    name: str = "analytic:ring8"  # embedded teacher name, analytic preset, a diffusers folder path, or a Hugging Face model id (org/name[@revision]) already in the local hub cache
    dtype: str = "fp32"  # teacher weights: fp32 | bf16 | fp16 (frozen; reduced precision saves memory)
    offload: bool = False  # keep the frozen teacher in CPU memory, moved to the GPU layer by layer per call (accelerate cpu_offload; slow, saves its weights' memory; full-copy students only)
    null_class: int | None = None  # class-conditional teachers: the label index trained as "no class" (CFG's unconditional branch); null = the folder's stepdistill_teacher.json, else none (every embedding is a real class, no CFG)

    def __post_init__(self):
        check_choice("teacher.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        if self.null_class is not None:
            check_range("teacher.null_class", self.null_class, 0)


@dataclass
class NetworkConfig:
    init: str = "copy"  # copy (full copy of the teacher) | lora (adapter on the shared base) | fit (weightless teachers) | compress (a smaller UNet of the teacher's class, from the teacher's remaining weights; docs/compress.md)
    compress: str = "bk"  # init=compress: the block-removal plan: bk (every BK-SDM cut that fits) | bk-base | bk-small | bk-tiny | a '+'-list of the cuts layers, mid, inner (e.g. mid+inner)
    lr: float = 1e-4  # AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 10.0  # max gradient norm (0 = off); DMD2: 10
    warmup_steps: int = 0  # linear LR warm-up from 0, in updates of this network (diffusers get_scheduler)
    lr_schedule: str = "constant"  # constant | cosine | linear | cosine_with_restarts | polynomial: diffusers.optimization.get_scheduler (decays over train.steps; a resume with more steps stretches it)
    lora_rank: int = 16  # LoRA rank r (init=lora)
    lora_alpha: float = 16.0  # LoRA alpha (scale = alpha / r)
    lora_targets: list[str] = field(default_factory=list)  # module names; empty = defaults for the model
    mlp_hidden: int = 128  # init=fit: hidden width of the MLP denoiser
    mlp_depth: int = 3  # init=fit: hidden layers
    fit_steps: int = 1500  # init=fit: steps of the denoising fit to the teacher
    fit_lr: float = 2e-3  # init=fit: learning rate of the fit

    def __post_init__(self):
        check_choice("init", self.init, ("copy", "lora", "fit", "compress"))
        from .adapters.compress import plan_cuts

        plan_cuts(self.compress)  # an unknown plan is a one-line error here, before anything loads
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine", "linear", "cosine_with_restarts", "polynomial"))
        # names without a section: _build prefixes them with the section (student., fake_score., ...)
        check_range("lr", self.lr, 0.0)
        if self.lr <= 0:
            raise StepdistillError(f"lr = {self.lr} must be > 0")
        if len(self.betas) != 2:
            raise StepdistillError(f"betas must be two numbers, got {list(self.betas)}")
        for b in self.betas:
            check_range("betas", b, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("grad_clip", self.grad_clip, 0.0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("lora_rank", self.lora_rank, 1)
        check_range("lora_alpha", self.lora_alpha, 0.0)
        check_range("mlp_hidden", self.mlp_hidden, 1)
        check_range("mlp_depth", self.mlp_depth, 1)
        check_range("fit_steps", self.fit_steps, 0)
        check_range("fit_lr", self.fit_lr, 0.0)
        if self.fit_lr <= 0:
            raise StepdistillError(f"fit_lr = {self.fit_lr} must be > 0")


@dataclass
class StudentConfig(NetworkConfig):
    times: list[float] = field(default_factory=lambda: [1.0])  # generation times t_0 > t_1 > ...; [1.0] = one step
    sigmas: list[float] = field(default_factory=list)  # instead of times: noise levels in EDM units (sigma/alpha, e.g. SiD's [2.5]), mapped onto each teacher's own schedule, so a recipe transfers between teachers; above the teacher's largest level = t 1; a student.times override replaces a recipe's sigmas
    ema_decay: float = 0.0  # EMA of the student weights (0 = off): the largest decay per student update (diffusers EMAModel decay); evaluation and export use the EMA
    feature_weight: float = 0.0  # KOALA / BK-SDM feature distillation: weight of the student-phase term mean_l ||f_l^student(x_t) - f_l^teacher(x_t)||^2 on the same noised input (0 = off); with any objective and student.init
    feature_layers: str = "attn"  # which features: attn (self-attention outputs of the aligned kept blocks) | blocks (same-shaped down/mid/up block outputs) | out (the x0 output only: the output-distillation baseline)
    ema_rampup: float = 0.05  # SiD's EMA ramp: half-life = min(H, ema_rampup x images seen), H the half-life of ema_decay (EMAModel use_ema_warmup, power 1, inv_gamma ln2/ema_rampup); 0 = EMAModel's (1+n)/(10+n) warm-up

    def __post_init__(self):
        super().__post_init__()
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("ema_rampup", self.ema_rampup, 0.0, 1.0)
        check_range("feature_weight", self.feature_weight, 0.0)
        check_choice("feature_layers", self.feature_layers, ("attn", "blocks", "out"))
        if not self.times:
            raise StepdistillError("times must list at least one generation time, e.g. [1.0]")
        for t in self.times:
            check_range("times", t, 0.0, 1.0)
        for v in self.sigmas:
            check_range("sigmas", v, 0.0)
            if v <= 0:
                raise StepdistillError(f"student.sigmas must be positive noise levels (sigma/alpha), got {self.sigmas}")
        if any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise StepdistillError(f"student.sigmas must be strictly decreasing, got {self.sigmas}")


@dataclass
class DataConfig:
    conditions: str = "auto"  # auto (from the teacher) | class_labels | none | prompts:<file, one prompt per line>
    real: str = ""  # real samples for objectives that use data: "" | teacher (analytic) | digits | <image folder>


@dataclass
class TrainConfig:
    steps: int = 1000  # rounds; one round = each phase's updates (e.g. critic_ratio critic + 1 student)
    batch_size: int = 64  # per process
    grad_accum: int = 1  # micro-batches per update
    seed: int = 0  # every random draw derives from it
    mixed_precision: str = "no"  # no | bf16 | fp16 (bf16 preferred: fp16 shares one grad scaler)
    cpu: bool = False  # force CPU even when a GPU is present
    log_every: int = 50  # rounds between console/JSONL/tensorboard logs
    sample_every: int = 250  # rounds between sample grids (0 = only at the end)
    checkpoint_every: int = 500  # rounds between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # how many checkpoints to keep
    max_nonfinite: int = 20  # consecutive non-finite updates before the run stops
    num_sample_images: int = 64  # samples in each grid / scatter plot
    gradient_checkpointing: bool = False  # recompute activations of the trained diffusers networks in backward (less memory, ~30% slower)
    distributed: str = "ddp"  # ddp (replicate) | fsdp (shard the trained full networks; FSDP2 via accelerate; not with LoRA)
    attention: str = "auto"  # auto (xformers when installed and on a GPU, else torch SDPA) | sdpa | xformers
    compile: str = "no"  # no | a torch.compile backend (inductor: torch's default): every network compiled in place (nn.Module.compile), checkpoints unchanged
    report_to: str = "tensorboard"  # accelerate trackers, comma-separated: tensorboard (<run>/tensorboard) | wandb | comet_ml | mlflow | aim | clearml | dvclive | swanlab | trackio | all (every installed one) | none

    def __post_init__(self):
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        check_choice("train.attention", self.attention, ("auto", "sdpa", "xformers"))
        check_choice("train.distributed", self.distributed, ("ddp", "fsdp"))
        if self.compile != "no":  # torch's dynamo backends (debug ones such as aot_eager included)
            import torch._dynamo

            check_choice("train.compile", self.compile, ("no", *torch._dynamo.list_backends(exclude_tags=())))
        for key in ("steps", "batch_size", "grad_accum", "log_every", "max_nonfinite", "num_sample_images"):
            check_range(f"train.{key}", getattr(self, key), 1)
        for key in ("sample_every", "checkpoint_every", "keep_checkpoints"):
            check_range(f"train.{key}", getattr(self, key), 0)
        check_range("train.seed", self.seed, 0, 2**32, high_open=True)


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake_score: NetworkConfig = field(default_factory=NetworkConfig)
    # extra networks an objective builds itself (GAN/discriminator heads): optimizer settings
    discriminator: NetworkConfig = field(default_factory=lambda: NetworkConfig(lr=1e-4, betas=(0.0, 0.99), weight_decay=0.0))
    objective: Any = None  # the objective's dataclass, chosen by objective.name
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------- checks


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or fail in one line."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # optional: null / none, else the other type
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0]) if len(inner) == 1 else value
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError
            if tp is int:
                if isinstance(value, int):
                    return value
                if not float(value).is_integer():
                    raise ValueError
                return int(float(value))
            out = float(value)
            check_finite(path, out)
            return out
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            items = value if isinstance(value, (list, tuple)) else _yaml_value(str(value), path)
            items = items if isinstance(items, (list, tuple)) else [items]
            args = typing.get_args(tp)
            if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
                raise ValueError
            return origin(_coerce(path, v, args[0]) for v in items) if args else origin(items)
    except (TypeError, ValueError, OverflowError):
        raise StepdistillError(f"{path}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


_NETWORK_KEYS = {f.name for f in dataclasses.fields(StudentConfig)}


def _build(cls, data: dict, path: str):
    """Instantiate dataclass ``cls`` from a dict, validating keys and types."""
    if not isinstance(data, dict):
        raise StepdistillError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in fields:
            raise StepdistillError(f"unknown config key {full!r}{_suggest(key, fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full)
        elif key == "objective" and cls is RunConfig:
            kwargs[key] = build_objective_config(value or {})
        else:
            kwargs[key] = _coerce(full, value, tp)
    try:
        return cls(**kwargs)
    except StepdistillError as e:  # a field check in __post_init__: name the section
        msg = str(e)
        if path and cls in (NetworkConfig, StudentConfig) and msg.split(" ", 1)[0] in _NETWORK_KEYS:
            msg = f"{path}.{msg}"
        raise StepdistillError(msg) from None


def build_objective_config(data: dict, path: str = "objective"):
    """The objective section (or a part of a composed one, at ``path``): ``name`` plus that objective's own fields."""
    from .objectives.registry import get_objective_class

    if not isinstance(data, dict):
        raise StepdistillError(f"{path}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("name", None)
    if not name:
        raise StepdistillError(f"{path}.name is required (e.g. dmd); see `stepdistill recipes`")
    name = str(name)
    if "." in name and name not in _IMPORTABLE.get():
        raise StepdistillError(f"{path}.name {name!r} is not a registered objective; a dotted import path is only "
                               f"accepted from the command line (objective.name={name}), never from a recipe or run folder")
    cls = get_objective_class(name)
    return _build(cls, data, path)


# dotted objective paths that may be imported while a config is built: only names the user gave as overrides
_IMPORTABLE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("stepdistill_importable", default=frozenset())


def _dotted_names(node) -> set[str]:
    """Every ``name`` value with a dot anywhere inside an override tree."""
    if isinstance(node, dict):
        own = {node["name"]} if isinstance(node.get("name"), str) and "." in node["name"] else set()
        return own.union(*(_dotted_names(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_dotted_names(v) for v in node))
    return set()


def _check_finite_tree(node, path: str) -> None:
    """NaN or infinity anywhere in a recipe (including lists such as objective.parts) is an error naming the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite_tree(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite_tree(v, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise StepdistillError(f"{path} = {node} is not a finite number")


# --------------------------------------------------------------------------------------- recipes


from .resources import recipes_dir  # noqa: E402  (re-exported: config.recipes_dir)


def list_recipes() -> list[str]:
    root = recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")) if root.is_dir() else []


def resolve_recipe(recipe: str) -> Path:
    """A recipe path, or a shipped recipe name such as ``toy2d/dmd``."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{recipe.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = list_recipes()
    raise StepdistillError(f"no recipe {recipe!r} (not a file, not a shipped recipe){_suggest(recipe, names)}; see `stepdistill recipes`")


def parse_overrides(overrides: list[str]) -> dict:
    """``["objective.guidance_scale=2", "train.steps=10"]`` -> nested dict (values YAML-parsed)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise StepdistillError(f"bad override {item!r}: expected section.key=value, e.g. objective.guidance_scale=2")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StepdistillError(f"override {item!r} conflicts with another override")
        node[leaf] = _yaml_value(raw, item) if raw else ""
    return out


def _yaml_value(raw: str, where: str):
    """A YAML scalar/list from the command line, or a one-line error naming the override."""
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise StepdistillError(f"override {where!r}: cannot read the value as YAML ({problem})") from None


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(recipe: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (path or shipped name), apply dotted overrides, validate everything."""
    data: dict = {}
    if recipe:
        path = resolve_recipe(recipe)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise StepdistillError(f"recipe {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise StepdistillError(f"cannot read recipe {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
        if not isinstance(data, dict):
            raise StepdistillError(f"recipe {str(path)!r} must be a mapping of sections (teacher:, student:, ...), "
                                   f"got {type(data).__name__}")
    over = parse_overrides(overrides or [])
    new_name = over.get("objective", {}).get("name") if isinstance(over.get("objective"), dict) else None
    if new_name and isinstance(data.get("objective"), dict) and data["objective"].get("name") != new_name:
        data = dict(data, objective={})  # another objective: the recipe's hyperparameters were for the old one
    student_over = over.get("student") if isinstance(over.get("student"), dict) else {}
    if "times" in student_over and "sigmas" not in student_over and isinstance(data.get("student"), dict):
        data = dict(data, student={k: v for k, v in data["student"].items() if k != "sigmas"})  # times given: they replace the recipe's sigmas
    data = merge(data, over)
    if isinstance(data.get("objective", {}), dict):
        data["objective"] = {"name": "dmd"} | data.get("objective", {})  # dmd is the default objective
    _check_finite_tree(data, "")
    token = _IMPORTABLE.set(frozenset(_dotted_names(over.get("objective"))))
    try:
        cfg = _build(RunConfig, data, "")
    finally:
        _IMPORTABLE.reset(token)
    cfg.explicit = frozenset(_dotted_keys(over))  # what the user set on the command line (teacher-derived defaults yield to it)
    return cfg


def _dotted_keys(node, prefix: str = "") -> set[str]:
    """``{"objective": {"guidance_scale": 2}}`` -> ``{"objective.guidance_scale"}``."""
    if not isinstance(node, dict):
        return {prefix} if prefix else set()
    return set().union(*(_dotted_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a mapping with the same key twice (the later one would win silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: Exception) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())[:200]


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict (for saving); the objective section gets its ``name`` back."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "objective":
            obj = {k.name: getattr(value, k.name) for k in dataclasses.fields(value) if k.init}
            out[f.name] = {"name": getattr(value, "registry_name", f"{type(value).__module__}.{type(value).__qualname__}")} | obj
        else:
            out[f.name] = dataclasses.asdict(value)
    return _plain(out)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
