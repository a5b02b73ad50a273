"""Cost of generation: network evaluations, latency, throughput, peak memory.

NFE convention: the number of denoiser-network evaluations **per image**, counted (not
computed) by a forward pre-hook as rows passed through the network divided by images made. A
classifier-free-guided step counts 2 (its conditional and unconditional rows), also when both
rows go through the network in one batched call: batching halves the calls, not the compute.
Text encoders and VAE decoders are not counted (their cost shows in latency).

Latency is the wall time of one batch of 1 image; throughput is images per second at the
given batch size. Both after one warm-up call, median over ``repeats`` timed calls, with
``torch.cuda.synchronize()`` around the timing on GPU. Peak memory: ``torch.cuda.max_memory_allocated``
on GPU (reset before the timed calls); on CPU the process's peak resident set (VmHWM), reset
before the timed calls through /proc/self/clear_refs where Linux allows it, else the
process-lifetime peak (flagged in the record).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import torch
from torch import nn


class NFECounter:
    """Counts rows through a set of networks (forward pre-hooks)."""

    def __init__(self, networks: list[nn.Module]):
        self.networks, self.rows, self._handles = networks, 0, []

    def _hook(self, _module, args, kwargs):
        x = args[0] if args else next((kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs), None)
        self.rows += int(x.shape[0]) if isinstance(x, torch.Tensor) else 0

    def __enter__(self) -> "NFECounter":
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.networks]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict filled on exit with ``peak_memory_bytes`` and how it was measured."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out |= {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "memory_kind": "cuda max_memory_allocated"}
        return
    reset = _reset_peak_rss()
    yield out
    kind = "cpu peak RSS (VmHWM, reset before timing)" if reset else "cpu peak RSS of the whole process"
    out |= {"peak_memory_bytes": _peak_rss_bytes(), "memory_kind": kind}


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cost(generate: Callable[[list[int]], object], batch_size: int, device: torch.device, repeats: int = 3) -> dict:
    """Latency (batch 1), throughput (``batch_size``) and peak memory of ``generate(seeds)``."""
    seeds = list(range(batch_size))
    generate([0])  # warm-up: lazy init, allocator, kernels
    generate(seeds)
    with peak_memory(device) as mem:
        latency = _timed(lambda: generate([0]), device, repeats)
        batch_time = _timed(lambda: generate(seeds), device, repeats)
    return {"latency_s": latency, "throughput_img_s": batch_size / batch_time, "cost_batch_size": batch_size,
            "timing_repeats": repeats, **mem}
