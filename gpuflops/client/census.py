"""Kernel census: which share of a training step's matrix work ran on half-rate tensor paths.

The daemon's tensor counters count the cycles the tensor pipes were busy, and one busy cycle is
worth a fixed number of FLOPs on Hopper's wgmma path (1024 bf16). Kernels built on the older
``mma.sync`` m16n8k8 instruction keep the pipe busy just as long for half the work: Nsight
Compute measured 512 executed ops per tensor cycle for cuBLAS's
``cutlass_75_tensorop_bf16_s1688gemm`` (chosen for GEMMs whose leading dimension is odd, such as
a 50257- or 32001-token vocabulary head), against 1024 for ``nvjet_sm90`` and cuDNN's wgmma
kernels (run 21, benchmarks/results/h200-run21-ncu-kernels.json). Only the process that
launches the kernels can see their names, so the client profiles one optimizer step with
``torch.profiler`` and reports, with every estimate, the FLOPs of that increment that ran on
such paths. The daemon records it as a claim and bounds what it can change (docs/accuracy.md).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


# Kernel names whose tensor work is done at half the ops per busy tensor cycle of the arch's
# fast path, each with the measurement that put it here.
HALF_RATE_KERNELS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"tensorop_(?:bf16|f16|h)_?s1688"),
     "mma.sync m16n8k8 16-bit GEMM: 512 ops per tensor cycle on H200 (ncu, run 21)"),
)


def is_half_rate(kernel: str) -> bool:
    return any(p.search(kernel) for p, _why in HALF_RATE_KERNELS)


@dataclass(frozen=True)
class Census:
    """One profiled step: matrix FLOPs in total and on half-rate kernels (torch's own counts)."""

    matmul_flops: float
    half_rate_flops: float
    kernels: dict[str, int] = field(default_factory=dict)  # half-rate kernel name -> launches
    linked_ops: int = 0  # operators whose kernels the profiler linked (0: census unusable)

    @property
    def usable(self) -> bool:
        return self.linked_ops > 0 and self.matmul_flops > 0


def census_of(events: Any) -> Census:
    """A census from ``torch.profiler.profile(..., with_flops=True).events()``.

    Each operator with a FLOP count (matmuls, convolutions) is charged to half-rate work when a
    kernel it launched matches :data:`HALF_RATE_KERNELS`.
    """
    total = half = 0.0
    linked = 0
    names: dict[str, int] = {}
    for evt in events:
        flops = float(getattr(evt, "flops", 0) or 0)
        kernels = [k.name for k in getattr(evt, "kernels", ()) or ()]
        if flops <= 0:
            continue
        total += flops
        if kernels:
            linked += 1
        slow = [k for k in kernels if is_half_rate(k)]
        if slow:
            half += flops
            for k in slow:
                names[k[:160]] = names.get(k[:160], 0) + 1
    return Census(total, half, names, linked)


class StepProfiler:
    """Profiles exactly one optimizer step with torch.profiler (CUDA activity, FLOPs)."""

    def __init__(self) -> None:
        self._prof: Any = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                             record_shapes=True, with_flops=True)
        self._prof.__enter__()

    def stop(self) -> Census | None:
        if self._prof is None:
            return None
        import torch

        torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        try:
            return census_of(prof.events())
        except Exception as exc:  # a profiler quirk must never stop the training run
            log.warning("gpuflops: kernel census failed: %s", exc)
            return None
