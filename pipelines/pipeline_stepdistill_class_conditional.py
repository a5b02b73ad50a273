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

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int], torch.Tensor],
        num_inference_steps: int = 1,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate one image per label. ``output_type``: "pil", "np" or "pt" (images in [0, 1])."""
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
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self._set_times(num_inference_steps, device)
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
