"""Sampler backends: each turns one GPU interval into a :class:`gpuflops.model.GpuSample`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gpuflops.model import GpuInfo, GpuSample


class SamplerError(Exception):
    """A backend cannot start or continue at all (no driver, unreadable trace, ...)."""


@runtime_checkable
class Sampler(Protocol):
    """One small interface between the hardware and the rest of the pipeline."""

    name: str

    def gpus(self) -> list[GpuInfo]:
        """Units this sampler measures (whole GPUs or MIG GPU instances)."""
        ...

    def sample(self) -> list[GpuSample]:
        """Block until the current interval ends; return one sample per unit.

        A unit whose counters could not be read this interval yields a sample with
        ``activity=None`` and ``error`` set: a gap, never zeros. Raises StopIteration when a
        finite source (a trace) is exhausted.
        """
        ...

    def close(self) -> None:
        """Release handles; safe to call twice."""
        ...
