"""diffusers model families behind the one contract.

A family is a small function that calls the model with the right keyword arguments, taking
what it needs from ``cond``:

| family            | model class                  | cond keys                                               |
|-------------------|------------------------------|---------------------------------------------------------|
| unet2d            | UNet2DModel                  | class_labels (optional)                                 |
| unet2d_condition  | UNet2DConditionModel         | prompt_embeds, [timestep_cond], [added_cond_kwargs]     |
| dit               | DiTTransformer2DModel        | class_labels                                            |
| sd3               | SD3Transformer2DModel        | prompt_embeds, pooled_prompt_embeds                     |
| sana              | SanaTransformer2DModel       | prompt_embeds, [prompt_attention_mask], [guidance]      |
"""

from __future__ import annotations

from typing import Callable


from torch import Tensor, nn

from ..contract import Cond, NoiseSchedule, StepdistillError, as_time, expand_like
from .convert import canonical_prediction_type, prediction_to_x0


def _need(cond: Cond, key: str, family: str) -> Tensor:
    if key not in cond or cond[key] is None:
        raise StepdistillError(f"the {family} adapter needs cond[{key!r}]; got keys {sorted(cond)}")
    return cond[key]


def _call_unet2d(model, x, timestep, cond):
    return model(x, timestep, class_labels=cond.get("class_labels")).sample


def _call_unet2d_condition(model, x, timestep, cond):
    return model(
        x,
        timestep,
        encoder_hidden_states=_need(cond, "prompt_embeds", "unet2d_condition"),
        timestep_cond=cond.get("timestep_cond"),
        added_cond_kwargs=cond.get("added_cond_kwargs"),
    ).sample


def _call_dit(model, x, timestep, cond):
    return model(x, timestep=timestep, class_labels=_need(cond, "class_labels", "dit")).sample


def _call_sd3(model, x, timestep, cond):
    return model(
        hidden_states=x,
        timestep=timestep,
        encoder_hidden_states=_need(cond, "prompt_embeds", "sd3"),
        pooled_projections=_need(cond, "pooled_prompt_embeds", "sd3"),
    ).sample


def _call_sana(model, x, timestep, cond):
    return model(
        x,
        encoder_hidden_states=_need(cond, "prompt_embeds", "sana"),
        timestep=timestep,
        guidance=cond.get("guidance"),
        encoder_attention_mask=cond.get("prompt_attention_mask"),
    ).sample


FAMILIES: dict[str, Callable] = {
    "unet2d": _call_unet2d,
    "unet2d_condition": _call_unet2d_condition,
    "dit": _call_dit,
    "sd3": _call_sd3,
    "sana": _call_sana,
}
_CLASS_TO_FAMILY = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "SanaTransformer2DModel": "sana",
}


def family_of(model: nn.Module) -> str:
    """The adapter family of a diffusers model instance (by class, including subclasses)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASS_TO_FAMILY:
            return _CLASS_TO_FAMILY[cls.__name__]
    raise StepdistillError(
        f"no adapter for {type(model).__name__}; supported: {', '.join(sorted(_CLASS_TO_FAMILY))}"
    )


class DiffusersDenoiser(nn.Module):
    """A diffusers model seen through the contract: forward(x_t, t, cond) -> x0_hat.

    Args:
        model: the diffusers network (any dtype; inputs are cast to it).
        schedule: the ``NoiseSchedule`` the model was trained with.
        prediction_type: epsilon | v_prediction | flow | sample.
        family: adapter family; inferred from the model class when omitted.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction_type: str, family: str | None = None):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.family = family or family_of(model)
        if self.family not in FAMILIES:
            raise StepdistillError(f"unknown adapter family {self.family!r}; expected one of {sorted(FAMILIES)}")

    def model_output(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The raw network output (native parameterisation) at continuous time t."""
        t = as_time(t, x_t)  # [B]
        timestep = self.schedule.to_native(t).to(x_t.device)  # [B], float: fractional steps allowed
        dtype = next(self.model.parameters()).dtype
        out = FAMILIES[self.family](self.model, x_t.to(dtype), timestep, dict(cond or {}))
        return out[:, : x_t.shape[1]]  # drop learned-variance channels (DiT learn_sigma)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        t = as_time(t, x_t)
        out = self.model_output(x_t, t, cond)  # [B, C, H, W]
        a = expand_like(self.schedule.alpha(t).to(x_t.device), x_t)
        s = expand_like(self.schedule.sigma(t).to(x_t.device), x_t)
        return prediction_to_x0(out, x_t, a, s, self.prediction_type).to(x_t.dtype)


def wrap(model: nn.Module, scheduler_or_config, prediction_type: str | None = None) -> DiffusersDenoiser:
    """Wrap a diffusers model with the schedule of its scheduler (instance or config dict)."""
    from ..schedules import schedule_from_scheduler_config

    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    if "_class_name" not in config and hasattr(scheduler_or_config, "config"):
        config["_class_name"] = type(scheduler_or_config).__name__
    schedule = schedule_from_scheduler_config(config)
    default = "flow" if schedule.kind == "flow" else config.get("prediction_type", "epsilon")
    return DiffusersDenoiser(model, schedule, prediction_type or default)


__all__ = ["DiffusersDenoiser", "FAMILIES", "family_of", "wrap"]
