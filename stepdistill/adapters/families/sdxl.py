"""SDXL: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` in ``StableDiffusionXLPipeline``.

Conditions: both CLIP encoders through ``StableDiffusionXLPipeline.encode_prompt`` (penultimate
hidden states concatenated, pooled ``text_embeds`` of ``text_encoder_2``; the null condition is
the pipeline's own negative branch with ``negative_prompt=None``: zeros when
``force_zeros_for_empty_prompt``), and ``time_ids`` = (original size, crop (0, 0), target size)
from ``_get_add_time_ids`` at the training resolution (latent size x the VAE's scale factor).
cond keys: ``prompt_embeds`` [B, 77, D], ``pooled_prompt_embeds`` [B, P], ``time_ids`` [B, 6].

Export: the stock ``StableDiffusionXLPipeline`` with the student UNet (a zero guidance projection,
so the pipeline never applies CFG), the teacher's VAE, tokenizers and text encoders, and
``LCMScheduler(original_inference_steps=1000)`` (the student must be trained on its grid:
[999], [999, 499], [999, 749, 499, 249], or on another ``original_inference_steps``' grid, which
export then writes: one step at s >= 500 -> s + 1); ``force_zeros_for_empty_prompt`` as trained. The
pipeline's ``add_watermarker`` default is left alone (it only applies when invisible-watermark is
installed, and never to ``output_type="latent"``). Call it at the training resolution
(``height``/``width`` default to the UNet's ``sample_size`` x 8 x ... = the training one). ``--lora``
also writes ``lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights`` on the teacher's
pipeline (``unet_lora_layers``).
"""

from __future__ import annotations

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, config_of, need, read_json, register_family
from .sd import check_lcm_grid, copy_parts, guidance_off, lcm_scheduler, save_lora, write_index
from .text import encoder_pipeline, prompt_conditioner

PIPELINE = "StableDiffusionXLPipeline"


def vae_scale_factor(folder) -> int:
    """2^(levels - 1) of the folder's VAE (the pipeline's own rule), 8 without ``vae/``."""
    path = folder / "vae" / "config.json"
    if not path.is_file():
        return 8
    return 2 ** (len(read_json(path).get("block_out_channels") or [0] * 4) - 1)


def training_resolution(folder, model, meta) -> tuple[int, int]:
    """(H, W) in pixels the teacher is distilled at: latent size x the VAE scale factor."""
    if meta.get("latent_shape"):
        h, w = (int(s) for s in meta["latent_shape"][-2:])
    else:
        size = model.config.get("sample_size") or 128
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = vae_scale_factor(folder)
    return h * f, w * f


@register_family
class SDXL(Family):
    name = "sdxl"
    network_classes = ("UNet2DConditionModel",)
    pipeline_classes = (PIPELINE,)
    subfolder = "unet"
    text = True

    def claims(self, model_or_config) -> bool:
        config = config_of(model_or_config)
        return super().claims(model_or_config) and config.get("addition_embed_type") == "text_time"

    def call(self, model, x, timestep, cond):
        added = {"text_embeds": need(cond, "pooled_prompt_embeds", self.name), "time_ids": need(cond, "time_ids", self.name)}
        return model(x, timestep, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     timestep_cond=cond.get("timestep_cond"), added_cond_kwargs=added).sample

    def conditioner(self, folder, model, meta, prompts):
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        pipe = encoder_pipeline(folder, PIPELINE, model, "unet", meta, image_encoder=None, feature_extractor=None,
                                force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
        for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if getattr(pipe, part, None) is None:
                raise StepdistillError(f"{folder} has no {part}/: an SDXL teacher needs both tokenizers and both text "
                                       "encoders in the folder (as StableDiffusionXLPipeline.save_pretrained writes them)")
        width = model.config.get("cross_attention_dim")
        got = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        if isinstance(width, int) and got != width:
            raise StepdistillError(f"{folder}: the two text encoders give {got}-d prompt embeddings but the teacher's UNet "
                                   f"takes {width}-d ones")
        height, width_px = training_resolution(folder, model, meta)
        projection_dim = int(pipe.text_encoder_2.config.projection_dim)

        def time_ids(n, dtype):
            try:
                ids = pipe._get_add_time_ids((height, width_px), (0, 0), (height, width_px), dtype=dtype,
                                             text_encoder_projection_dim=projection_dim)
            except ValueError as e:
                raise StepdistillError(f"{folder}: {str(e).splitlines()[0]}") from None
            return ids.repeat(n, 1)

        def encode(texts):
            pe, _, pooled, _ = pipe.encode_prompt(list(texts), device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "time_ids": time_ids(len(texts), pe.dtype)}

        def encode_null():  # the pipeline's own negative branch for negative_prompt=None (zeros when force_zeros)
            _, npe, _, npooled = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=True, negative_prompt=None)
            return {"prompt_embeds": npe, "pooled_prompt_embeds": npooled, "time_ids": time_ids(1, npe.dtype)}

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), int(meta.get("num_classes") or 0)

    def dummy_cond(self, config, batch):
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config.get("addition_time_embed_dim", 256)
        return {"prompt_embeds": torch.zeros(batch, 77, config["cross_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, pooled), "time_ids": torch.zeros(batch, 6)}

    def export(self, job: ExportJob) -> dict:
        folder = job.teacher.folder
        sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        origin = check_lcm_grid(job.times, int(sched_cfg.get("num_train_timesteps", 1000)), PIPELINE)
        missing = [p for p in ("vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2") if not (folder / p).is_dir()]
        if missing:
            raise StepdistillError(f"{folder} lacks {', '.join(missing)}/: a stock {PIPELINE} folder needs the teacher's "
                                   "VAE, both tokenizers and both text encoders")
        guidance_off(job.model).save_pretrained(job.out / "unet", safe_serialization=True)
        lcm_scheduler(job.teacher, sched_cfg, origin).save_pretrained(job.out / "scheduler")
        copy_parts(folder, job.out, ("vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        write_index(job.out, PIPELINE, {
            "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": force_zeros,
            "scheduler": ["diffusers", "LCMScheduler"],
            "text_encoder": index.get("text_encoder", ["transformers", "CLIPTextModel"]),
            "text_encoder_2": index.get("text_encoder_2", ["transformers", "CLIPTextModelWithProjection"]),
            "tokenizer": index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
            "tokenizer_2": index.get("tokenizer_2", ["transformers", "CLIPTokenizer"]),
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": index.get("vae", ["diffusers", "AutoencoderKL"])})
        height, width = training_resolution(folder, job.model, job.teacher.info or {})
        written = {"pipeline": PIPELINE, "scheduler": "LCMScheduler", "lcm_original_inference_steps": origin, "text_encoder_in_folder": True,
                   "force_zeros_for_empty_prompt": force_zeros, "height": height, "width": width}
        if job.lora_state is not None:
            written["lora_file"] = save_lora(PIPELINE, job)
        return written
