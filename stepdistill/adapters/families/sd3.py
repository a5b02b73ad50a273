"""SD3 / SD3.5: ``SD3Transformer2DModel`` in ``StableDiffusion3Pipeline`` (rectified flow).

Conditions: CLIP-L + CLIP-G + T5 through ``StableDiffusion3Pipeline.encode_prompt`` itself
(``prompt_2=prompt_3=None``, ``do_classifier_free_guidance=True``); cond keys ``prompt_embeds``
[B, 77 + T5 length, D] and ``pooled_prompt_embeds`` [B, P]; the null condition is the
pipeline's own negative branch for ``""``. ``max_sequence_length`` (the T5 length) is
``stepdistill_teacher.json``'s ``max_sequence_length``, else the pipeline default 256; export
writes it into the call arguments, since training and inference must pad T5 alike. The network
sees sigma * 1000 (float32), as the pipeline passes it.

Export (shared with FLUX, ``export_flow``): the stock pipeline folder with the student
transformer, the teacher's VAE, text encoders and tokenizers, and
``FlowMatchEulerDiscreteScheduler.from_config(base, shift=1.0, use_dynamic_shifting=False)``, so
``sigmas=`` replay verbatim (the scheduler is asked, the student's times are checked against
what it runs). With shift 1 the default N-step SD3 schedule is linspace(1, 1/1000, N), which is
the student's only for N = 1: other step counts need ``sigmas=[...]`` at call time, written
into the model card and ``call_kwargs``. CFG must be off at call time (``guidance_scale=1``:
the pipeline's default 7 would batch a negative prompt the student never saw).

Multi-step students re-noise x0 with fresh noise between steps (``few_step_sample``): the
folder's scheduler then has ``stochastic_sampling=True``, whose noise the stock pipeline draws
from the *global* torch RNG (SD3 does not pass ``generator`` to ``scheduler.step``), so a
caller seeds ``torch.manual_seed`` for the step noise and ``generator`` for the initial noise.
"""

from __future__ import annotations

import json

import torch

from ...contract import StepdistillError
from . import ExportJob, Family, need, read_json, register_family
from .text import encoder_pipeline, prompt_conditioner

T5_MAX = 512  # StableDiffusion3Pipeline / FluxPipeline check_inputs reject longer T5 sequences


def max_sequence_length(meta: dict, default: int, folder) -> int:
    n = meta.get("max_sequence_length", default)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= T5_MAX:
        raise StepdistillError(f"{folder}/stepdistill_teacher.json: max_sequence_length must be an integer in 1..{T5_MAX}, got {n!r}")
    return n


def flow_scheduler(folder, stochastic: bool):
    """The teacher's FlowMatchEulerDiscreteScheduler config with every sigma transform off."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = read_json(folder / "scheduler" / "scheduler_config.json")
    return FlowMatchEulerDiscreteScheduler.from_config(
        base, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=stochastic)


def replay_kwargs(scheduler, times: list[float], default_sigmas) -> dict:
    """``num_inference_steps`` alone when the pipeline's default schedule is the student's, else ``sigmas=``.

    ``default_sigmas``: what the pipeline hands ``set_timesteps`` without ``sigmas`` (None: nothing,
    SD3; a list: FLUX's linspace). The scheduler is asked; a mismatch it cannot avoid is an error.
    """
    import numpy as np

    n = len(times)
    want = np.asarray(times, dtype=np.float32)

    def run(sigmas):
        s = type(scheduler).from_config(scheduler.config)
        if sigmas is None:  # retrieve_timesteps: num_inference_steps only without sigmas
            s.set_timesteps(n, device="cpu")
        else:
            s.set_timesteps(sigmas=sigmas, device="cpu")
        return s.sigmas[:-1].numpy(), s.timesteps.numpy()

    got, steps = run(default_sigmas)
    if got.shape == want.shape and np.array_equal(got, want):
        return {"num_inference_steps": n}
    got, steps = run([float(t) for t in times])
    if not (np.array_equal(got, want) and np.allclose(steps, want * scheduler.config.num_train_timesteps, rtol=0, atol=1e-3)):
        raise StepdistillError(f"the exported FlowMatchEulerDiscreteScheduler runs sigmas {got.tolist()} for student times "
                               f"{list(times)}; the stock pipeline cannot replay this student")
    return {"sigmas": [float(t) for t in times]}


def check_times(times: dict[int, list[float]], pipeline: str) -> None:
    for n, ts in times.items():
        if not all(0 < t <= 1 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise StepdistillError(f"the stock {pipeline} runs descending sigmas in (0, 1]; a {n}-step student trained at "
                                   f"{ts} cannot be replayed (use student.times such as [1.0, 0.75, 0.5, 0.25])")


def vae_scale_factor(folder) -> int:
    cfg = read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    return 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)


def export_flow(job: ExportJob, pipeline: str, components: dict, default_sigmas, extra_call: dict) -> dict:
    """Write a stock flow pipeline folder (SD3 / FLUX); returns the export metadata."""
    from .sd import copy_parts, save_lora

    folder = job.teacher.folder
    check_times(job.times, pipeline)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    sched_name = (index.get("scheduler") or [None, None])[1] or read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
    if sched_name != "FlowMatchEulerDiscreteScheduler":
        raise StepdistillError(f"{folder}: a {pipeline} teacher with scheduler {sched_name!r} is not supported for export "
                               "(expected FlowMatchEulerDiscreteScheduler)")
    stochastic = max(job.times) > 1  # fresh noise between steps, as few_step_sample
    scheduler = flow_scheduler(folder, stochastic)
    calls = {str(n): replay_kwargs(scheduler, ts, default_sigmas(n)) | extra_call for n, ts in sorted(job.times.items())}
    job.model.save_pretrained(job.out / "transformer", safe_serialization=True)
    scheduler.save_pretrained(job.out / "scheduler")
    parts = [k for k in components if k.startswith(("text_encoder", "tokenizer")) and (index.get(k) or [""])[0] is not None]
    parts.append("vae")
    copy_parts(folder, job.out, parts)
    missing = [p for p in parts if not (job.out / p).is_dir()]
    if missing:
        raise StepdistillError(f"{folder} has no {', '.join(missing)}/: a stock {pipeline} folder needs them (as save_pretrained writes them)")
    entries = {k: index.get(k, v) for k, v in components.items()}
    entries |= {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer": ["diffusers", type(job.model).__name__]}
    doc = {"_class_name": pipeline, "_diffusers_version": __import__("diffusers").__version__} | entries
    (job.out / "model_index.json").write_text(json.dumps(doc, indent=2) + "\n")
    written = {"pipeline": pipeline, "scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder_in_folder": True,
               "call_kwargs": calls, "stochastic_sampling": stochastic,
               "step_noise": "global torch RNG (seed torch.manual_seed before the call)" if stochastic else None}
    if job.lora_state is not None:
        written["lora_file"] = save_lora(pipeline, job, component="transformer")
    return written


@register_family
class SD3(Family):
    name = "sd3"
    network_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    subfolder = "transformer"
    text = True
    # examples/dreambooth/train_dreambooth_lora_sd3.py (families.md 5.6)
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")

    def call(self, model, x, timestep, cond):
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=need(cond, "prompt_embeds", self.name),
                     pooled_projections=need(cond, "pooled_prompt_embeds", self.name)).sample

    def conditioner(self, folder, model, meta, prompts):
        pipe = encoder_pipeline(folder, "StableDiffusion3Pipeline", model, "transformer", meta)
        length = max_sequence_length(meta, 256, folder)  # StableDiffusion3Pipeline's default

        def both(texts):
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device="cpu",
                                                    do_classifier_free_guidance=True, max_sequence_length=length)
            return pe, npe, ppe, nppe

        def encode(texts):
            pe, _, ppe, _ = both(texts)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}

        def encode_null():  # the pipeline's own negative branch (negative_prompt "" for every encoder)
            _, npe, _, nppe = both([""])
            return {"prompt_embeds": npe, "pooled_prompt_embeds": nppe}

        return prompt_conditioner(folder, meta, prompts, encode, encode_null), 0

    def dummy_cond(self, config, batch):
        return {"prompt_embeds": torch.zeros(batch, 77 + 256, config["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.zeros(batch, config["pooled_projection_dim"])}

    def export(self, job: ExportJob) -> dict:
        folder = job.teacher.folder
        size = job.teacher.sample_shape[-2:]
        f = vae_scale_factor(folder)
        extra = {"height": int(size[0]) * f, "width": int(size[1]) * f, "guidance_scale": 1.0,
                 "max_sequence_length": max_sequence_length(job.teacher.info or {}, 256, folder)}
        components = {"text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
                      "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}
        return export_flow(job, "StableDiffusion3Pipeline", components, lambda n: None, extra)
