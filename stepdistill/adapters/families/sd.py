"""Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` (no added conditions) in ``StableDiffusionPipeline``.

Conditions come from ``StableDiffusionPipeline.encode_prompt`` itself (no attention mask for
CLIP, the last hidden state; the null prompt ``""``), so a student trains on exactly the
embeddings the stock pipeline feeds it. Epsilon and v-prediction teachers (the scheduler
config says which).

Export: the stock pipeline with the student UNet and ``LCMScheduler(original_inference_steps=
1000)``, whose grid [999], [999, 499], [999, 749, 499, 249] the student must be trained at
(or another ``original_inference_steps`` whose grid is the student's: one step at 625 -> 626);
the UNet gets a zero ``time_cond_proj_dim`` projection so the pipeline never applies CFG (the
teacher's guidance is baked in). ``--lora`` also writes ``pytorch_lora_weights.safetensors``
for ``pipe.load_lora_weights`` on the teacher's pipeline.
"""

from __future__ import annotations

import json
import shutil

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, config_of, need, read_json, register_family
from .text import encoder_pipeline, prompt_conditioner


def lcm_grid(num_steps: int, num_train_timesteps: int = 1000, original_steps: int | None = None) -> list[int]:
    """Timesteps ``LCMScheduler(original_inference_steps=original_steps or num_train_timesteps)`` uses for ``num_steps``."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_steps or num_train_timesteps)
    sched.set_timesteps(num_steps)
    return [int(t) for t in sched.timesteps]


def check_lcm_grid(times: dict[int, list[float]], n_train: int, pipeline: str) -> int:
    """The ``original_inference_steps`` whose ``LCMScheduler`` grid is every step count's times, or a one-line error.

    ``n_train`` first (the grid [999], [999, 499], ...); then any other: its grid for one step is
    m * (n_train // m) - 1, so a one-step student at step 625 (EDM sigma 2.5 on SD's schedule)
    replays with ``original_inference_steps=626``.
    """
    from diffusers import LCMScheduler

    want = {n: [int(round(t * (n_train - 1))) for t in ts] for n, ts in times.items()}
    off = {n: ts for n, ts in times.items() if any(abs(t * (n_train - 1) - round(t * (n_train - 1))) > 1e-4 for t in ts)}
    sched = LCMScheduler(num_train_timesteps=n_train, original_inference_steps=n_train)
    for m in [n_train, *range(n_train - 1, max(want) - 1, -1)] if not off and want else []:
        ok = True
        for n, w in want.items():
            sched.set_timesteps(n, original_inference_steps=m)
            if [int(t) for t in sched.timesteps] != w:
                ok = False
                break
        if ok:
            return m
    n, ts = next(iter((off or times).items()))
    grid = lcm_grid(n, n_train)
    first = int(round(ts[0] * (n_train - 1)))
    alt = lcm_grid(n, n_train, first + 1) if n_train // 2 <= first < n_train - 1 else []
    near = (f"; from this student's first step {first}: student.times={[round(g / (n_train - 1), 9) for g in alt]} "
            f"(timesteps {alt}, original_inference_steps={first + 1})") if n > 1 and alt and alt[0] == first else ""
    raise StepdistillError(f"the stock {pipeline} replays LCMScheduler's grid: a {n}-step student must be trained at "
                           f"student.times={[round(g / (n_train - 1), 6) for g in grid]} (timesteps {grid}) or at "
                           f"timesteps another original_inference_steps gives (one step: any of {n_train // 2}-{n_train - 1}"
                           f"{near}); this one was trained at {ts}")


def guidance_off(unet, dim: int = 256):
    """Give a UNet a zero ``time_cond_proj_dim`` projection: output unchanged, pipeline CFG off."""
    if unet.config.get("time_cond_proj_dim") is not None:
        return unet
    config = dict(unet.config) | {"time_cond_proj_dim": dim}
    new = type(unet).from_config(config)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or [k for k in missing if "cond_proj" not in k]:
        raise StepdistillError("could not add the guidance projection to the student UNet")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.to(next(unet.parameters()).dtype)


def lcm_scheduler(teacher, sched_cfg: dict, original_steps: int | None = None):
    from diffusers import LCMScheduler

    n_train = int(sched_cfg.get("num_train_timesteps", 1000))
    prediction = teacher.denoiser.prediction_type
    return LCMScheduler.from_config(sched_cfg, original_inference_steps=original_steps or n_train, clip_sample=False, thresholding=False,
                                    timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True,  # LCM ignores steps_offset; 1 spares the SD pipeline its rewrite warning
                                    prediction_type=prediction if prediction != "flow" else "epsilon")


def write_index(out, pipeline: str, components: dict) -> None:
    index = {"_class_name": pipeline, "_diffusers_version": __import__("diffusers").__version__} | components
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_parts(folder, out, parts) -> None:
    for part in parts:
        if (folder / part).is_dir():
            shutil.copytree(folder / part, out / part)


def save_lora(pipeline_cls, job: ExportJob, component: str = "unet") -> str:
    """The student adapter as ``lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights``."""
    import diffusers

    if job.lora_state is None:
        raise StepdistillError("--lora: this student is a full network (student.init=copy); export it without --lora")
    folder = job.out / "lora"
    getattr(diffusers, pipeline_cls).save_lora_weights(folder, **{f"{component}_lora_layers": job.lora_state,
                                                                  f"{component}_lora_adapter_metadata": job.lora_config},
                                                       safe_serialization=True)
    return str(folder / "pytorch_lora_weights.safetensors")


@register_family
class SD(Family):
    name = "sd"
    network_classes = ("UNet2DConditionModel",)
    pipeline_classes = ("StableDiffusionPipeline",)
    subfolder = "unet"
    text = True

    def claims(self, model_or_config) -> bool:
        config = config_of(model_or_config)
        return super().claims(model_or_config) and config.get("addition_embed_type") != "text_time"

    def call(self, model, x, timestep, cond):
        return model(x, timestep, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     timestep_cond=cond.get("timestep_cond"), added_cond_kwargs=cond.get("added_cond_kwargs")).sample

    def conditioner(self, folder, model, meta, prompts):
        pipe = encoder_pipeline(folder, "StableDiffusionPipeline", model, "unet", meta, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
        width = model.config.get("cross_attention_dim")
        if isinstance(width, int) and pipe.text_encoder.config.hidden_size != width:
            raise StepdistillError(f"{folder}: the text encoder gives {pipe.text_encoder.config.hidden_size}-d prompt embeddings "
                                   f"but the teacher's network takes {width}-d ones")

        def encode(texts):
            return {"prompt_embeds": pipe.encode_prompt(texts, "cpu", 1, False)[0]}

        def encode_null():
            return {"prompt_embeds": pipe.encode_prompt([""], "cpu", 1, True, negative_prompt=None)[1]}

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), int(meta.get("num_classes") or 0)

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 77, config["cross_attention_dim"])}

    def export(self, job: ExportJob) -> dict:
        folder = job.teacher.folder
        sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        origin = check_lcm_grid(job.times, int(sched_cfg.get("num_train_timesteps", 1000)), "StableDiffusionPipeline")
        guidance_off(job.model).save_pretrained(job.out / "unet", safe_serialization=True)
        lcm_scheduler(job.teacher, sched_cfg, origin).save_pretrained(job.out / "scheduler")
        copy_parts(folder, job.out, ("vae", "tokenizer", "text_encoder"))
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        write_index(job.out, "StableDiffusionPipeline", {
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "LCMScheduler"],
            "text_encoder": index.get("text_encoder", ["transformers", "CLIPTextModel"]),
            "tokenizer": index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
        written = {"pipeline": "StableDiffusionPipeline", "scheduler": "LCMScheduler", "lcm_original_inference_steps": origin,
                   "text_encoder_in_folder": (job.out / "text_encoder").is_dir()}
        if job.lora_state is not None:
            written["lora_file"] = save_lora("StableDiffusionPipeline", job)
        return written
