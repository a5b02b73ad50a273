"""FLUX.1: ``FluxTransformer2DModel`` in ``FluxPipeline`` (flow), CLIP (pooled) + T5, packed latents.

The toolkit's samples stay unpacked latents [B, C, H, W]; the call packs them into 2x2 patches
[B, HW/4, 4C] with their image ids and unpacks the output (``FluxPipeline._pack_latents``,
``_prepare_latent_image_ids``, ``_unpack_latents``). The network gets exactly what the pipeline
passes: ``timestep = (sigma * 1000).to(dtype) / 1000`` (it multiplies by 1000 itself, so bf16
rounding matches) and, for guidance-distilled (dev) networks, ``guidance`` [B] float32.

Conditions: ``FluxPipeline.encode_prompt(prompt, prompt_2=None, max_sequence_length=...)``;
cond keys ``prompt_embeds`` [B, L, D], ``pooled_prompt_embeds`` [B, P], and ``guidance`` [B]
when ``guidance_embeds`` is set. ``stepdistill_teacher.json`` may give ``max_sequence_length``
(default 512, the pipeline's; FLUX.1-schnell is published with 256) and ``guidance`` (the
distilled-guidance value fed to a dev network, default 3.5 = the pipeline's ``guidance_scale``;
an error for networks without a guidance embedding). FLUX has no negative branch: the null
condition is ``encode_prompt("")``, what the pipeline's true CFG (``true_cfg_scale``) uses for an
empty negative prompt; it is only read when a recipe asks for teacher CFG
(``objective.guidance_scale`` != 1; the shipped FLUX recipe keeps 1).

Latent size: ``stepdistill_teacher.json`` ``latent_shape`` [C, H, W] (H, W even), else
(in_channels / 4, 128, 128): FluxPipeline's default ``default_sample_size`` (1024 px at f8).

Export: stock ``FluxPipeline`` folder (``sd3.export_flow``), ``FlowMatchEulerDiscreteScheduler``
with shift 1 and no dynamic shifting. The pipeline's default sigmas are linspace(1, 1/N, N), so
students at [1.0] or [1.0, 0.75, 0.5, 0.25] replay with ``num_inference_steps=N`` alone; other
times go in ``call_kwargs`` as ``sigmas=``. Multi-step students: ``stochastic_sampling=True``,
the step noise comes from the global torch RNG and is drawn in the *packed* layout
[B, HW/4, 4C], i.e. the same Gaussian noise as the toolkit's sampler in another element order;
the stock folder runs the same sampler (x0, then fresh noise at the next sigma), but a given seed
gives other images than ``few_step_sample`` with that seed (export metadata ``step_noise``).
"""

from __future__ import annotations

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, need, register_family
from .sd3 import export_flow, max_sequence_length, vae_scale_factor
from .text import encoder_pipeline, prompt_conditioner

DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size


def pack(x):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h: int, w: int):
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] (FluxPipeline._unpack_latents)."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype):
    """[(H/2)(W/2), 3] = [0, row, col] (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def guidance_value(meta: dict, config: dict, folder) -> float | None:
    """The distilled-guidance value a dev network is fed (None without a guidance embedding)."""
    value = meta.get("guidance")
    if not config.get("guidance_embeds"):
        if value is not None:
            raise StepdistillError(f"{folder}/stepdistill_teacher.json sets guidance={value!r}, but this FLUX transformer has "
                                   "no guidance embedding (guidance_embeds=false, schnell-style): remove it")
        return None
    value = 3.5 if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise StepdistillError(f"{folder}/stepdistill_teacher.json: guidance must be a number, got {value!r}")
    return float(value)


@register_family
class Flux(Family):
    name = "flux"
    network_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    subfolder = "transformer"
    text = True
    # examples/dreambooth/train_dreambooth_lora_flux.py (families.md 6.6)
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def call(self, model, x, timestep, cond):
        h, w = x.shape[-2:]
        pe = need(cond, "prompt_embeds", self.name)
        guidance = need(cond, "guidance", self.name).float() if model.config.get("guidance_embeds") else None
        out = model(hidden_states=pack(x), timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                    pooled_projections=need(cond, "pooled_prompt_embeds", self.name), encoder_hidden_states=pe,
                    txt_ids=torch.zeros(pe.shape[1], 3, device=x.device, dtype=pe.dtype),
                    img_ids=image_ids(h, w, x.device, x.dtype)).sample
        return unpack(out, h, w)

    def sample_shape(self, config, codec):
        return (int(config["in_channels"]) // 4, DEFAULT_LATENT, DEFAULT_LATENT)

    def conditioner(self, folder, model, meta, prompts):
        shape = meta.get("latent_shape")
        if shape is not None and (len(shape) != 3 or shape[1] % 2 or shape[2] % 2):
            raise StepdistillError(f"{folder}/stepdistill_teacher.json: a FLUX latent_shape is [C, H, W] with even H and W "
                                   f"(2x2 packing), got {shape}")
        pipe = encoder_pipeline(folder, "FluxPipeline", model, "transformer", meta)
        length = max_sequence_length(meta, 512, folder)  # FluxPipeline's default
        guidance = guidance_value(meta, dict(model.config), folder)

        def encode(texts):
            pe, ppe, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device="cpu", num_images_per_prompt=1,
                                            max_sequence_length=length)
            cond = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
            if guidance is not None:  # FluxPipeline: torch.full([1], guidance_scale, float32).expand(B)
                cond["guidance"] = torch.full((len(texts),), guidance, dtype=torch.float32)
            return cond

        def encode_null():  # no negative branch: true CFG's empty negative prompt, read only for teacher CFG
            return encode([""])

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), 0

    def dummy_cond(self, config, batch):
        cond = {"prompt_embeds": torch.zeros(batch, 512, config["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, config["pooled_projection_dim"])}
        if config.get("guidance_embeds"):
            cond["guidance"] = torch.full((batch,), 3.5)
        return cond

    def export(self, job: ExportJob) -> dict:
        import numpy as np

        folder, meta = job.teacher.folder, job.teacher.info or {}
        size = job.teacher.sample_shape[-2:]
        f = vae_scale_factor(folder)
        extra = {"height": int(size[0]) * f, "width": int(size[1]) * f, "max_sequence_length": max_sequence_length(meta, 512, folder)}
        guidance = guidance_value(meta, dict(job.model.config), folder)
        if guidance is not None:
            extra["guidance_scale"] = guidance  # the dev network's guidance input, as trained
        components = {"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                      "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}
        written = export_flow(job, "FluxPipeline", components, lambda n: np.linspace(1.0, 1 / n, n), extra)
        if written["stochastic_sampling"]:
            written["step_noise"] = ("global torch RNG, drawn in the packed layout [B, HW/4, 4C]: same sampler as the toolkit's, "
                                     "other noise order (a seed gives other images than few_step_sample)")
        return written
