"""Class-conditional pixel/latent networks: ``UNet2DModel`` and ``DiTTransformer2DModel``.

Stock diffusers has no few-step pipeline for them, so a student is exported with
``StepdistillClassConditionalPipeline`` (``pipelines/``, carried in the folder; torch + diffusers
only) and the scheduler that replays the toolkit's few-step sampler: ``LCMScheduler`` (VP) or
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` (flow).

Null class: a diffusers class-conditional UNet has no null class unless its training made one.
It is read from the folder's ``stepdistill_teacher.json`` (``null_class``) or ``teacher.null_class``;
otherwise every embedding is a real class and the teacher runs without CFG (said in one line).
DiT's ``LabelEmbedding`` always reserves index ``num_classes`` for the dropped label.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

from ...contract import StepdistillError
from . import ExportJob, Family, need, read_json, register_family

PIPELINE_CLASS = "StepdistillClassConditionalPipeline"


def _export_class_conditional(family: Family, job: ExportJob) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    from ...resources import pipeline_file

    teacher = job.teacher
    sched_cfg = read_json(teacher.folder / "scheduler" / "scheduler_config.json")
    if teacher.denoiser.schedule.kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True, shift=1.0,
                                                                use_dynamic_shifting=False)
    else:
        n_train = int(sched_cfg.get("num_train_timesteps", 1000))
        for ts in job.times.values():
            off = [t for t in ts if abs(t * (n_train - 1) - round(t * (n_train - 1))) > 1e-4]
            if off:
                raise StepdistillError(f"student times {off} fall between the teacher's integer timesteps; LCMScheduler "
                                       "replays integer steps only (train with times t = k / 999)")
        scheduler = LCMScheduler.from_config(sched_cfg, clip_sample=False, thresholding=False, set_alpha_to_one=True,
                                             prediction_type=teacher.denoiser.prediction_type)
    path = pipeline_file()
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    null = getattr(teacher.conditioner, "null_class", None)
    pipe = getattr(module, PIPELINE_CLASS)(scheduler=scheduler, **{family.subfolder: job.model},
                                           student_times={str(k): v for k, v in job.times.items()}, null_class=null)
    pipe.save_pretrained(job.out, safe_serialization=True)
    shutil.copy(path, job.out / path.name)
    index = read_json(job.out / "model_index.json")
    index["_class_name"] = [path.stem, PIPELINE_CLASS]  # custom code inside the folder
    (job.out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"pipeline": PIPELINE_CLASS, "scheduler": type(scheduler).__name__, "component": family.subfolder}


_SAID: set[str] = set()  # folders whose "no null class" line was already written (once per process)


def _class_labels(num_classes: int, null_class, name: str, embeds: int | None = None):
    from ...conditioning import ClassLabels

    if null_class is not None:
        null_class = int(null_class)
        limit = embeds if embeds is not None else num_classes + 1
        if not num_classes <= null_class < limit:  # labels are drawn from 0..num_classes-1, so the null sits after them
            raise StepdistillError(f"{name}: null class {null_class} must be an embedding after the {num_classes} drawn classes "
                                   f"({num_classes}..{limit - 1}); set teacher.null_class to the last embedding, or null")
    elif name not in _SAID:
        _SAID.add(name)
        print(f"{name}: no null class recorded (stepdistill_teacher.json `null_class` or teacher.null_class); "
              f"all {num_classes} embeddings are real classes and classifier-free guidance is off", file=sys.stderr)
    return ClassLabels(num_classes, null_class), num_classes


def _guidance_fields(node, path, record=None):
    """Every ``*guidance_scale*`` number of an objective (a composed one's parts too):
    ``(dataclass, field, dotted path, value, default, record)``; ``record`` is the dict a composed
    objective saves for that part (``objective.parts[i]``), kept in step when the value changes."""
    import dataclasses

    if not (dataclasses.is_dataclass(node) and not isinstance(node, type)):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if "guidance_scale" in f.name and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield node, f.name, f"{path}.{f.name}", value, f.default, record
    for i, part in enumerate(getattr(node, "_parts", None) or []):  # Compose: the built parts and their saved dicts
        yield from _guidance_fields(part.objective, f"{path}.parts[{i}]", node.parts[i])


def _cfg_off(name: str, value) -> bool:
    return value == 1 or (name.endswith("_max") and value == 0)  # vsd: guidance_scale_max 0 = fixed w


def resolve_guidance(teacher, objective, explicit=frozenset(), log=print) -> list[str]:
    """CFG on a class-conditional teacher without a null class (``teacher.null_class``): guidance a
    recipe asks for is turned off (its field back to the objective's default, 1) with one line, so a
    recipe pointed at such a teacher with only ``teacher.name`` changed runs; guidance the user set
    on the command line (``explicit``, dotted keys) is a one-line error. Returns what was turned off."""
    from ...conditioning import ClassLabels

    cond = getattr(teacher, "conditioner", None)
    if not isinstance(cond, ClassLabels) or cond.null_class is not None:
        return []
    dropped, touched = [], {}
    for node, name, path, value, default, record in list(_guidance_fields(objective, "objective")):
        if _cfg_off(name, value):
            continue
        given = any(path == k or path.startswith((k + ".", k + "[")) for k in explicit)  # objective.parts=[...] too
        if given or not _cfg_off(name, default):
            raise StepdistillError(f"{path}={value} needs classifier-free guidance, but teacher {teacher.name!r} has no null class: "
                                   f"set teacher.null_class=<index trained as 'no class'> if it has one, else guidance 1")
        setattr(node, name, default)
        if record is not None:
            record[name] = default
        dropped.append(f"{path}={value}")
        touched[id(node)] = node
    for node in touched.values():  # state an objective derived from its guidance (teacher-made sample pools)
        if callable(getattr(node, "setup", None)):
            node.setup()
    if dropped:
        log(f"teacher {teacher.name!r} has no null class: the recipe's {', '.join(dropped)} set to no guidance "
            "(classifier-free guidance needs an unconditional branch)")
    return dropped


@register_family
class UNet2D(Family):
    """``UNet2DModel``: unconditional, or class-conditional through ``num_class_embeds``."""

    name = "unet2d"
    network_classes = ("UNet2DModel",)
    subfolder = "unet"
    lora_loader = False

    def call(self, model, x, timestep, cond):
        return model(x, timestep, class_labels=cond.get("class_labels")).sample

    def conditioner(self, folder, model, meta, prompts):
        from ...conditioning import Unconditional

        embeds = model.config.get("num_class_embeds")
        if not embeds and not meta.get("num_classes"):
            return Unconditional(), 0
        null = meta.get("null_class")
        num = int(meta.get("num_classes") or (embeds - 1 if null is not None else embeds))
        return _class_labels(num, null, str(folder), embeds)

    def dummy_cond(self, config, batch):
        import torch

        return {"class_labels": torch.zeros(batch, dtype=torch.long)} if config.get("num_class_embeds") else {}

    def export(self, job):
        return _export_class_conditional(self, job)


@register_family
class DiT(Family):
    """``DiTTransformer2DModel``: class-conditional (``num_embeds_ada_norm`` classes + the dropped label)."""

    name = "dit"
    network_classes = ("DiTTransformer2DModel",)
    subfolder = "transformer"
    lora_loader = False

    def call(self, model, x, timestep, cond):
        return model(x, timestep=timestep, class_labels=need(cond, "class_labels", "dit")).sample

    def conditioner(self, folder, model, meta, prompts):
        num = int(meta.get("num_classes") or model.config.get("num_embeds_ada_norm") or 0)
        if not num:
            raise StepdistillError(f"{folder}: a DiT teacher needs num_embeds_ada_norm classes in its config")
        return _class_labels(num, meta.get("null_class", num), str(folder))

    def dummy_cond(self, config, batch):
        import torch

        return {"class_labels": torch.zeros(batch, dtype=torch.long)}

    def export(self, job):
        return _export_class_conditional(self, job)
