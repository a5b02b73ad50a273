"""SANA: ``SanaTransformer2DModel`` in ``SanaPipeline`` (flow), Gemma-2 text encoder, ``AutoencoderDC``.

Conditions come from ``SanaPipeline.encode_prompt`` itself (right padding, the attention mask,
BOS + the last ``max_sequence_length - 1`` positions, ``clean_caption=False``); cond keys
``prompt_embeds`` [B, L, D] and ``prompt_attention_mask`` [B, L]; the null condition is the
pipeline's negative branch of ``""``. The prompt is prefixed with the complex human instruction
(CHI) that ``SanaPipeline.__call__`` uses by default, so a student trains on exactly what
``pipe(prompt)`` feeds it; ``stepdistill_teacher.json`` may set ``"complex_human_instruction":
null`` (no CHI, then pass ``complex_human_instruction=None`` to the pipeline) or its own list, and
``"max_sequence_length"`` (default 300). The network sees sigma * 1000 * ``timestep_scale``
(families.md 7.2).

Export: the stock ``SanaPipeline`` with the student transformer and
``FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)``, called with
``sigmas=<student times>``: shift 1 replays the sigmas verbatim, and the pipeline hands its
generator to ``scheduler.step``, which predicts x0 and re-noises it to the next sigma exactly as
``few_step_sample`` does. ``--lora`` writes ``lora/`` for ``SanaPipeline.load_lora_weights``.
SANA-Sprint (``SanaSprintPipeline``, ``SCMScheduler``, guidance-embedding networks) is refused.
"""

from __future__ import annotations

import inspect

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, need, read_json, register_family
from .sd import copy_parts, save_lora, write_index
from .text import encoder_pipeline, prompt_conditioner

SPRINT = ("SANA-Sprint teachers (SanaSprintPipeline, guidance_embeds networks) are not supported yet: distill a "
          "SanaPipeline teacher (any objective, sCM included; it exports as SanaPipeline)")


def default_chi() -> list[str]:
    """The complex human instruction ``SanaPipeline.__call__`` prefixes by default."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def encoding_args(meta: dict) -> dict:
    """``encode_prompt`` / ``__call__`` text arguments of this teacher (as trained = as exported)."""
    chi = meta["complex_human_instruction"] if "complex_human_instruction" in meta else default_chi()
    if chi is not None and not (isinstance(chi, list) and all(isinstance(s, str) for s in chi)):
        raise StepdistillError(f"stepdistill_teacher.json: complex_human_instruction must be null or a list of strings, got {chi!r}")
    return {"clean_caption": False, "max_sequence_length": int(meta.get("max_sequence_length") or 300),
            "complex_human_instruction": chi}


def _is_sprint(folder, model) -> bool:
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return index.get("_class_name") == "SanaSprintPipeline" or bool(model.config.get("guidance_embeds"))


@register_family
class Sana(Family):
    name = "sana"
    network_classes = ("SanaTransformer2DModel",)
    pipeline_classes = ("SanaPipeline", "SanaSprintPipeline")
    subfolder = "transformer"
    text = True
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' SANA dreambooth set + the output projection

    def call(self, model, x, timestep, cond):
        scale = float(getattr(model.config, "timestep_scale", 1.0) or 1.0)  # SanaPipeline: t * timestep_scale
        return model(x, encoder_hidden_states=need(cond, "prompt_embeds", self.name), timestep=timestep * scale,
                     encoder_attention_mask=cond.get("prompt_attention_mask")).sample

    def sample_shape(self, config, codec):
        shape = super().sample_shape(config, codec)
        latent = codec.vae.config.get("latent_channels") if codec is not None else None
        if latent is not None and latent != shape[0]:
            raise StepdistillError(f"the SANA transformer takes {shape[0]} latent channels but the folder's VAE has {latent}")
        return shape

    def conditioner(self, folder, model, meta, prompts):
        if _is_sprint(folder, model):
            raise StepdistillError(SPRINT)
        pipe = encoder_pipeline(folder, "SanaPipeline", model, "transformer", meta)
        width = model.config.get("caption_channels")
        if pipe.text_encoder.config.hidden_size != width:
            raise StepdistillError(f"{folder}: the text encoder gives {pipe.text_encoder.config.hidden_size}-d prompt embeddings "
                                   f"but the SANA transformer's caption_channels is {width}")
        args = encoding_args(meta)

        def encode(texts):
            pe, pm, _, _ = pipe.encode_prompt(texts, False, device="cpu", **args)
            return {"prompt_embeds": pe, "prompt_attention_mask": pm}

        def encode_null():  # the pipeline's own negative branch of "" (no CHI, as __call__ does)
            _, _, npe, npm = pipe.encode_prompt([""], True, negative_prompt="", device="cpu", **args)
            return {"prompt_embeds": npe, "prompt_attention_mask": npm}

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), 0

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 300, config["caption_channels"]),
                "prompt_attention_mask": torch.ones(batch, 300, dtype=torch.long)}

    def export(self, job: ExportJob) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler

        folder = job.teacher.folder
        if _is_sprint(folder, job.model):
            raise StepdistillError(SPRINT)
        n_train = int(read_json(folder / "scheduler" / "scheduler_config.json").get("num_train_timesteps", 1000))
        job.model.save_pretrained(job.out / "transformer", safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=n_train, shift=1.0, use_dynamic_shifting=False,
                                        stochastic_sampling=True).save_pretrained(job.out / "scheduler")
        copy_parts(folder, job.out, ("vae", "tokenizer", "text_encoder"))
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        write_index(job.out, "SanaPipeline", {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": index.get("text_encoder", ["transformers", "Gemma2Model"]),
            "tokenizer": index.get("tokenizer", ["transformers", "GemmaTokenizer"]),
            "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": index.get("vae", ["diffusers", "AutoencoderDC"])})
        args = encoding_args(job.teacher.info or {})
        text = {"max_sequence_length": args["max_sequence_length"]}
        if args["complex_human_instruction"] != default_chi():  # trained without __call__'s default: the caller must say so
            text["complex_human_instruction"] = args["complex_human_instruction"]
        call = {str(n): {"sigmas": [float(t) for t in ts], "guidance_scale": 1.0, **text} for n, ts in job.times.items()}
        written = {"pipeline": "SanaPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "call_kwargs": call,
                   "text_encoder_in_folder": (job.out / "text_encoder").is_dir(),
                   "step_noise": "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) re-noises x0 to the next sigma with "
                                 "the call's generator (SanaPipeline passes it to scheduler.step)"}
        if job.lora_state is not None:
            written["lora_file"] = save_lora("SanaPipeline", job, component="transformer")
        return written
