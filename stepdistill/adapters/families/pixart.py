"""PixArt-Sigma: ``PixArtTransformer2DModel`` in ``PixArtSigmaPipeline`` (VP, epsilon + learned sigma), T5.

Conditions come from ``PixArtSigmaPipeline.encode_prompt`` itself (T5 with its attention mask,
``clean_caption=False`` explicitly: ``__call__`` defaults to True, which silently depends on bs4
and ftfy being installed; ``max_sequence_length`` 300 or ``stepdistill_teacher.json``'s); cond
keys ``prompt_embeds`` [B, L, D] and ``prompt_attention_mask`` [B, L]; the null condition is the
pipeline's negative branch of ``""``. The network is called as the pipeline calls it
(``added_cond_kwargs`` resolution / aspect ratio None, so transformers built with
``use_additional_conditions=True`` are refused); the learned-variance half of the output is
dropped by the denoiser.

Export: the stock ``PixArtSigmaPipeline`` with the student transformer and
``LCMScheduler.from_config(teacher scheduler, original_inference_steps=1000)``, whose grid
[999], [999, 499], [999, 749, 499, 249] the student must be trained at (or another
``original_inference_steps``' grid, which export then writes: one step at s >= 500 -> s + 1; the student's times snap
to floor(t * 999): [1.0] and [1.0, 0.75, 0.5, 0.25] are on it); ``pipe(prompt,
num_inference_steps=N, guidance_scale=1.0, clean_caption=False)``. No diffusers LoRA loader:
LoRA students export merged.
"""

from __future__ import annotations

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, need, read_json, register_family
from .sd import check_lcm_grid, copy_parts, lcm_scheduler, write_index
from .text import encoder_pipeline, prompt_conditioner


def encoding_args(meta: dict) -> dict:
    """``encode_prompt`` / ``__call__`` text arguments of this teacher (as trained = as exported)."""
    return {"clean_caption": False, "max_sequence_length": int(meta.get("max_sequence_length") or 300)}


@register_family
class PixArt(Family):
    name = "pixart"
    network_classes = ("PixArtTransformer2DModel",)
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    subfolder = "transformer"
    text = True
    lora_loader = False
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # families.md 9.6

    def call(self, model, x, timestep, cond):
        return model(x, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     encoder_attention_mask=cond.get("prompt_attention_mask"), timestep=timestep,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def conditioner(self, folder, model, meta, prompts):
        if getattr(model, "use_additional_conditions", False):
            raise StepdistillError(f"{folder}: the PixArt transformer uses resolution/aspect-ratio conditions (PixArt-alpha, or "
                                   "sample_size 128 without the key): write \"use_additional_conditions\": false in its config.json "
                                   "(PixArt-Sigma passes none)")
        pipe = encoder_pipeline(folder, "PixArtSigmaPipeline", model, "transformer", meta)
        width = model.config.get("caption_channels")
        if pipe.text_encoder.config.d_model != width:
            raise StepdistillError(f"{folder}: the text encoder gives {pipe.text_encoder.config.d_model}-d prompt embeddings "
                                   f"but the PixArt transformer's caption_channels is {width}")
        args = encoding_args(meta)

        def encode(texts):
            pe, pm, _, _ = pipe.encode_prompt(texts, False, device="cpu", **args)
            return {"prompt_embeds": pe, "prompt_attention_mask": pm}

        def encode_null():
            _, _, npe, npm = pipe.encode_prompt([""], True, negative_prompt="", device="cpu", **args)
            return {"prompt_embeds": npe, "prompt_attention_mask": npm}

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), 0

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 300, config["caption_channels"]),
                "prompt_attention_mask": torch.ones(batch, 300, dtype=torch.long)}

    def export(self, job: ExportJob) -> dict:
        folder = job.teacher.folder
        sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        origin = check_lcm_grid(job.times, int(sched_cfg.get("num_train_timesteps", 1000)), "PixArtSigmaPipeline")
        job.model.save_pretrained(job.out / "transformer", safe_serialization=True)
        lcm_scheduler(job.teacher, sched_cfg, origin).save_pretrained(job.out / "scheduler")
        copy_parts(folder, job.out, ("vae", "tokenizer", "text_encoder"))
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        write_index(job.out, "PixArtSigmaPipeline", {
            "scheduler": ["diffusers", "LCMScheduler"],
            "text_encoder": index.get("text_encoder", ["transformers", "T5EncoderModel"]),
            "tokenizer": index.get("tokenizer", ["transformers", "T5Tokenizer"]),
            "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": index.get("vae", ["diffusers", "AutoencoderKL"])})
        args = encoding_args(job.teacher.info or {})
        call = {str(n): {"num_inference_steps": n, "guidance_scale": 1.0, **args} for n in job.times}
        return {"pipeline": "PixArtSigmaPipeline", "scheduler": "LCMScheduler", "lcm_original_inference_steps": origin, "call_kwargs": call,
                "text_encoder_in_folder": (job.out / "text_encoder").is_dir(),
                "step_noise": "LCMScheduler re-noises x0 to the next timestep with the call's generator; keep "
                              "clean_caption=False (the student was trained on uncleaned captions); no diffusers LoRA loader "
                              "for PixArt, the weights are merged"}
