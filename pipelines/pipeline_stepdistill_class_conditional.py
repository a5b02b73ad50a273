# A class-conditional few-step pipeline for distilled students, in diffusers' own style.
#
# Standalone: imports only torch and diffusers, so an exported folder carries this file and loads
# without stepdistill installed:
#
#     pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
#     images = pipe(class_labels=[3, 7], num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
#
# Stock diffusers has no pipeline for a class-conditional pixel-space UNet2DModel (DDPMPipeline
# passes no labels) nor for a class-conditional flow DiT without a VAE (DiTPipeline hard-codes
# the null class 1000 and a VAE). This one runs either network with the scheduler saved beside
# it: LCMScheduler (x0 prediction, then re-noise with fresh noise: the toolkit's few-step
# sampler for VP students) or FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) (the
# same for flow students). The continuous times the student was trained at are part of the
# pipeline config (``student_times``: {"N": [t_0, ..., t_N-1]}, t in [0, 1]), so
# ``num_inference_steps=N`` replays them exactly: VP timestep = t * (num_train_timesteps - 1),
# flow sigma = t.

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class StepdistillClassConditionalPipeline(DiffusionPipeline):
    """Few-step class-conditional generation with a distilled UNet2DModel or DiTTransformer2DModel.

    Args:
        scheduler: LCMScheduler (VP students) or FlowMatchEulerDiscreteScheduler with
            ``stochastic_sampling=True`` (flow students).
        unet: a class-conditional ``UNet2DModel`` (give this or ``transformer``).
        transformer: a class-conditional ``DiTTransformer2DModel``.
        student_times: {"N": [t_0, ...]} continuous times per exported step count.
        null_class: the label index of the unconditional branch (classifier-free guidance).
        default_guidance_scale: CFG scale used when the call gives none (1.0: the student has
            the teacher's guidance baked in).
    """

    model_cpu_offload_seq = "unet->transformer"
    _optional_components = ["unet", "transformer"]

    def __init__(self, scheduler, unet=None, transformer=None, student_times: Optional[dict] = None,
                 null_class: Optional[int] = None, default_guidance_scale: float = 1.0):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("give exactly one of unet and transformer")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)
        self.register_to_config(student_times=dict(student_times or {}), null_class=null_class,
                                default_guidance_scale=default_guidance_scale)

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer

    def _network(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device).expand(len(x))
        if self.unet is not None:
            return self.unet(x, t, class_labels=labels).sample
        out = self.transformer(x, timestep=t, class_labels=labels).sample
        return out[:, : x.shape[1]]  # learned-sigma channels, if any, are not part of the prediction

    def _set_times(self, num_inference_steps: int, device) -> None:
        times = self.config.student_times.get(str(num_inference_steps))
        if times is None:
            raise ValueError(f"this student was exported for num_inference_steps in "
                             f"{sorted(int(k) for k in self.config.student_times)}, not {num_inference_steps}")
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            self.scheduler.set_timesteps(sigmas=[float(t) for t in times], device=device)
        else:
            last = self.scheduler.config.num_train_timesteps - 1
            self.scheduler.set_timesteps(timesteps=[int(round(float(t) * last)) for t in times], device=device)

    def _teacher_handover(self, x, labels, teacher, teacher_scheduler, teacher_steps: int, teacher_schedule: int,
                          guidance_scale: float, null_class: Optional[int]):
        """The teacher's first k steps of its own N-step deterministic solver from x (diversity distillation).

        VP teachers: ``DDIMScheduler`` (eta 0, ``timestep_spacing="trailing"``, the teacher's x0 clipping)
        built from ``teacher_scheduler.config``; flow teachers: ``FlowMatchEulerDiscreteScheduler``.
        Returns x after k steps and where it stands: the native timestep the DDIM step reached (VP) or
        the flow sigma.
        """
        from diffusers import DDIMScheduler

        if not 0 < teacher_steps < teacher_schedule:
            raise ValueError(f"teacher_steps={teacher_steps} does not fit a {teacher_schedule}-step teacher schedule: "
                             f"use 0 < teacher_steps < {teacher_schedule} (the student takes at least the last step)")
        if guidance_scale > 1 and null_class is None:
            raise ValueError("teacher_guidance_scale > 1 needs the teacher's null class (teacher_null_class)")
        config = {k: v for k, v in dict(teacher_scheduler.config).items() if not k.startswith("_")}
        flow = "FlowMatch" in type(teacher_scheduler).__name__
        solver = FlowMatchEulerDiscreteScheduler.from_config(config) if flow else \
            DDIMScheduler.from_config(config, timestep_spacing="trailing")
        solver.set_timesteps(teacher_schedule, device=x.device)
        # a clipped x0 steps with the noise recomputed from it, as stepdistill's own DDIM (evaluation.sources.step_kwargs)
        clips = not flow and (solver.config.get("clip_sample") or solver.config.get("thresholding"))
        clipped = {"use_clipped_model_output": True} if clips else {}
        x = x * getattr(solver, "init_noise_sigma", 1.0)
        for ts in solver.timesteps[:teacher_steps]:
            t = ts.to(x.device).expand(len(x))
            if guidance_scale > 1:
                null = torch.full_like(labels, null_class)
                both = teacher(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
                out_c, out_u = both[:, : x.shape[1]].float().chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = teacher(x, t, class_labels=labels).sample[:, : x.shape[1]]
            x = solver.step(out.to(x.dtype), ts, x, **clipped).prev_sample
        if flow:
            return x, float(solver.sigmas[teacher_steps])
        prev = int(solver.timesteps[teacher_steps - 1]) - solver.config.num_train_timesteps // solver.num_inference_steps
        return x, prev

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int], torch.Tensor],
        num_inference_steps: int = 1,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        teacher: Optional[torch.nn.Module] = None,
        teacher_scheduler=None,
        teacher_steps: int = 0,
        teacher_schedule: int = 4,
        teacher_guidance_scale: float = 1.0,
        teacher_null_class: Optional[int] = None,
    ):
        """Generate one image per label. ``output_type``: "pil", "np" or "pt" (images in [0, 1]).

        ``latents``: the starting noise [B, C, H, W] (default: drawn from ``generator``). ``timesteps``
        (VP, native) or ``sigmas`` (flow) replace the exported times, as in diffusers' stock pipelines.

        Hybrid inference (the teacher's first step(s), then the student): pass the teacher network
        (``teacher``: the UNet2DModel / DiTTransformer2DModel the student was distilled from, with the
        same class labels) and its scheduler (``teacher_scheduler``, e.g. ``DDPMScheduler`` of the teacher
        folder), and ``teacher_steps`` = k >= 1. The teacher runs the first k of ``teacher_schedule`` = N
        steps of its deterministic solver (DDIM trailing / flow Euler, CFG at ``teacher_guidance_scale``
        with ``teacher_null_class``); the student then finishes from there at the time the teacher
        reached, followed by its own exported times below it. NFE: k (x2 with CFG) + the student's steps.
        """
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels, dtype=torch.long)
        net = self.denoiser
        device, dtype = self._execution_device, net.dtype
        labels = labels.to(device)
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        if scale > 1 and self.config.null_class is None:
            raise ValueError("guidance_scale > 1 needs a null class; this model has none")
        cfg = net.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (len(labels), cfg.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this model samples {shape}")
        flow = isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)
        if teacher_steps:
            if teacher is None or teacher_scheduler is None:
                raise ValueError("teacher_steps > 0 needs the teacher network (teacher=) and its scheduler (teacher_scheduler=)")
            x, reached = self._teacher_handover(latents.to(device, dtype), labels, teacher, teacher_scheduler, teacher_steps,
                                                teacher_schedule, teacher_guidance_scale, teacher_null_class)
            own = self.config.student_times.get(str(num_inference_steps))
            if own is None:
                raise ValueError(f"this student was exported for num_inference_steps in "
                                 f"{sorted(int(k) for k in self.config.student_times)}, not {num_inference_steps}")
            if flow:
                sigmas = [reached] + [float(t) for t in own if float(t) < reached - 1e-6]
            else:
                last = self.scheduler.config.num_train_timesteps - 1
                timesteps = [reached] + [g for g in (int(round(float(t) * last)) for t in own) if g < reached]
            x = x / getattr(self.scheduler, "init_noise_sigma", 1.0)
        else:
            x = latents.to(device, dtype)
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=[float(s) for s in sigmas], device=device)
        elif timesteps is not None:
            self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
        else:
            self._set_times(num_inference_steps, device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        for t in self.progress_bar(self.scheduler.timesteps):
            if scale > 1:
                null = torch.full_like(labels, self.config.null_class)
                out_c, out_u = self._network(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
                out = out_u + scale * (out_c - out_u)
            else:
                out = self._network(x, t, labels)
            x = self.scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
