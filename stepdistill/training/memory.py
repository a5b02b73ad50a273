"""Memory and speed levers applied by the trainer: attention backend, gradient checkpointing, teacher
offload, ``torch.compile``.

* Attention: diffusers' default processors already use torch SDPA (flash / memory-efficient
  kernels on GPU, the math kernel on CPU). ``train.attention=auto`` switches to xformers only
  when it is installed and the run is on a GPU; ``xformers`` insists (one-line error otherwise).
* Gradient checkpointing: diffusers' own ``enable_gradient_checkpointing`` on the trained
  networks (the student and the fake score; with LoRA, the shared base, which only matters
  when a graph is built: teacher calls run without one). With LoRA views on one base, a block is
  recomputed in backward after other views have switched the active adapter (SiD backpropagates
  through teacher and fake score); the checkpoint function therefore records each block's adapter
  routing at forward time and restores it for the recomputation (``context_fn``).
* Teacher offload: accelerate's ``cpu_offload`` keeps the frozen teacher's weights in CPU RAM
  and streams each layer to the GPU for its forward; it saves the teacher's weights' memory at a
  large speed cost, and cannot be used when LoRA views share the teacher's base.
* Compile: ``train.compile=<backend>`` (``inductor``, torch's default) compiles every distinct
  network (teacher, student, fake score; a LoRA base once) in place with ``nn.Module.compile``:
  parameters, ``state_dict`` keys, checkpoints and EMA swaps are those of the eager network, so a
  run may resume with compile switched on or off. The objectives' Python (losses, CFG, adapter
  switches) stays eager; a switch of LoRA adapter recompiles that network (dynamo guards on the
  module's state). sCM's ``torch.func.jvp`` tangent falls back to finite differences if the
  compiled network cannot run forward-mode AD. On the 2-core CPU machine a digits UNet's
  forward+backward ran 1.1-1.2x faster (forward 1.6x) after a 174 s first compile (``eval/ABLATIONS.md``).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

from ..contract import StepdistillError
from .networks import tuner_layers, unwrap

ATTENTION_CHOICES = ("auto", "sdpa", "xformers")


def _diffusers_model(module: nn.Module) -> nn.Module | None:
    inner = unwrap(module)
    inner = getattr(inner, "model", inner)
    return inner if hasattr(inner, "set_attn_processor") or hasattr(inner, "enable_gradient_checkpointing") else None


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def choose_attention(choice: str, device: torch.device | str) -> str:
    """The backend a run uses: ``sdpa`` or ``xformers`` (one-line error for an impossible request)."""
    if choice not in ATTENTION_CHOICES:
        raise StepdistillError(f"train.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    on_gpu = torch.device(device).type == "cuda"
    if choice == "xformers":
        if not xformers_available():
            raise StepdistillError("train.attention=xformers, but xformers is not installed (pip install stepdistill[xformers])")
        if not on_gpu:
            raise StepdistillError("train.attention=xformers needs a CUDA device; use train.attention=auto or sdpa on CPU")
        return "xformers"
    if choice == "auto" and on_gpu and xformers_available():
        return "xformers"
    return "sdpa"


def set_attention_backend(module: nn.Module, choice: str, device) -> str | None:
    """Apply the chosen backend to a diffusers network; None when the module has no attention."""
    backend = choose_attention(choice, device)
    model = _diffusers_model(module)
    if model is None or not hasattr(model, "set_attn_processor") or not getattr(model, "attn_processors", None):
        return None
    if backend == "xformers":
        model.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        procs = model.attn_processors
        if all(type(p).__name__ == "AttnProcessor" for p in procs.values()):  # old eager default only
            model.set_attn_processor(AttnProcessor2_0())
    return backend


def enable_gradient_checkpointing(module: nn.Module) -> bool:
    """Turn on diffusers' gradient checkpointing; False when the network has none (e.g. the toy MLP)."""
    model = _diffusers_model(module)
    if model is None or not getattr(model, "_supports_gradient_checkpointing", False):
        return False
    model.enable_gradient_checkpointing(adapter_aware_checkpoint)
    return True


def _routing(layers: list) -> list[tuple[bool, list]]:
    return [(layer._disable_adapters, list(layer._active_adapter)) for layer in layers]


@contextlib.contextmanager
def _routed(layers: list, routing: list[tuple[bool, list]]):
    """LoRA layers routed as in ``routing`` for the duration (restored after)."""
    now = _routing(layers)
    for layer, (disabled, active) in zip(layers, routing):
        layer._disable_adapters, layer._active_adapter = disabled, active
    try:
        yield
    finally:
        for layer, (disabled, active) in zip(layers, now):
            layer._disable_adapters, layer._active_adapter = disabled, active


def adapter_aware_checkpoint(block: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func``: non-reentrant checkpoint of ``block`` whose
    recomputation sees the LoRA routing (teacher / student / fake score) of the original forward."""
    from torch.utils.checkpoint import checkpoint

    layers = tuner_layers(block)
    if not layers:
        return checkpoint(block.__call__, *args, use_reentrant=False)
    routing = _routing(layers)
    return checkpoint(block.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _routed(layers, routing)))


def offload_teacher(denoiser: nn.Module, device) -> str:
    """Stream the frozen teacher's layers from CPU RAM to ``device`` per forward (accelerate)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "teacher.offload: the run is on the CPU already; nothing to offload"
    from accelerate import cpu_offload

    model = getattr(denoiser, "model", denoiser)
    cpu_offload(model.to("cpu"), execution_device=device)
    return f"teacher offloaded to CPU RAM, executed on {device}"


__all__ = ["choose_attention", "set_attention_backend", "enable_gradient_checkpointing", "offload_teacher", "xformers_available"]


def compile_networks(modules, backend: str, log) -> None:
    """``nn.Module.compile`` (in place: the same parameters and state_dict keys) on each network's diffusers
    model (``backend`` checked by the config: ``train.compile``)."""
    done = {}
    for m in modules:
        inner = unwrap(m)
        inner = getattr(inner, "model", inner) if hasattr(inner, "schedule") else inner  # the contract adapter's network
        if id(inner) not in done:
            inner.compile(backend=backend)
            done[id(inner)] = type(inner).__name__
    log(f"torch.compile ({backend}): {', '.join(done.values())} (the first rounds include compilation)")


def apply_memory_levers(trainables: dict, teacher, cfg, device, log) -> None:
    """Attention backend, gradient checkpointing of the trained networks, teacher CPU offload, compile (from ``cfg``)."""
    modules = {id(tr.module): tr.module for tr in trainables.values()} | {id(teacher.denoiser): teacher.denoiser}
    backend = {set_attention_backend(m, cfg.train.attention, device) for m in modules.values()} - {None}
    if backend:
        log(f"attention: {', '.join(sorted(backend))}")
    if cfg.train.gradient_checkpointing:
        done = [n for n, tr in trainables.items() if n in ("student", "fake_score") and enable_gradient_checkpointing(tr.module)]
        log(f"gradient checkpointing on: {', '.join(done) or 'none (no diffusers network to checkpoint)'}")
    if cfg.teacher.offload:
        if any(tr.adapter for tr in trainables.values()):
            raise StepdistillError("teacher.offload=true needs full-copy networks: with LoRA the teacher's base is the trained networks' base")
        log(offload_teacher(teacher.denoiser, device))
    if cfg.train.compile != "no":
        compile_networks(modules.values(), cfg.train.compile, log)
