"""A diffusers network behind the one contract: ``DiffusersDenoiser(x_t, t, cond) -> x0_hat``.

How the network is called, which timestep it takes and what its conditions are belong to its
family record (``adapters/families/``); this wrapper adds the schedule and turns the native
output (epsilon, v, flow velocity or sample) into an x0 estimate in fp32.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..contract import Cond, NoiseSchedule, StepdistillError, as_time, expand_like
from .convert import canonical_prediction_type, prediction_to_x0
from .families import Family, families, family_for_model, get_family


def family_of(model: nn.Module) -> str:
    """The family name of a diffusers network instance (by class and config)."""
    return family_for_model(model).name


class DiffusersDenoiser(nn.Module):
    """A diffusers model seen through the contract: forward(x_t, t, cond) -> x0_hat.

    Args:
        model: the diffusers network (any dtype; inputs are cast to it).
        schedule: the ``NoiseSchedule`` the model was trained with.
        prediction_type: epsilon | v_prediction | flow | sample.
        family: family record or name; inferred from the model when omitted.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction_type: str, family: Family | str | None = None):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if isinstance(family, str) and family not in families():
            raise StepdistillError(f"unknown adapter family {family!r}; expected one of {sorted(families())}")
        self.record = get_family(family) if isinstance(family, str) else (family or family_for_model(model))

    @property
    def family(self) -> str:
        return self.record.name

    def model_output(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The raw network output (native parameterisation) at continuous time t."""
        t = as_time(t, x_t)  # [B]
        timestep = self.record.native_timestep(self.schedule, t).to(x_t.device)  # [B], float: fractional steps allowed
        dtype = next(self.model.parameters()).dtype
        out = self.record.call(self.model, x_t.to(dtype), timestep, dict(cond or {}))
        return out[:, : x_t.shape[1]]  # drop learned-variance channels (DiT / PixArt learn_sigma)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        t = as_time(t, x_t)
        out = self.model_output(x_t, t, cond)  # [B, C, H, W]
        a = expand_like(self.schedule.alpha(t).to(x_t.device), x_t)
        s = expand_like(self.schedule.sigma(t).to(x_t.device), x_t)
        return prediction_to_x0(out, x_t, a, s, self.prediction_type).to(x_t.dtype)


def wrap(model: nn.Module, scheduler_or_config, prediction_type: str | None = None, family: Family | str | None = None) -> DiffusersDenoiser:
    """Wrap a diffusers model with the schedule of its scheduler (instance or config dict)."""
    from ..schedules import schedule_from_scheduler_config

    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    if "_class_name" not in config and hasattr(scheduler_or_config, "config"):
        config["_class_name"] = type(scheduler_or_config).__name__
    schedule = schedule_from_scheduler_config(config)
    default = "flow" if schedule.kind == "flow" else config.get("prediction_type", "epsilon")
    return DiffusersDenoiser(model, schedule, prediction_type or default, family)


__all__ = ["DiffusersDenoiser", "family_of", "wrap"]
