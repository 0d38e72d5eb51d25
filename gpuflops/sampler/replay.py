"""Replays a recorded trace as if it were a live GPU: at real or accelerated speed, looping.

Sample times are moved onto the wall clock: the first interval starts when replay starts and
every later one keeps its recorded offset (plus one trace span per completed loop). With
``speed`` > 1 intervals are emitted faster than their timestamps advance; their recorded
durations, and so their FLOPs, are unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpuflops.model import GpuInfo, GpuSample, ProcessUtilSample
from gpuflops.sampler.base import SamplerError
from gpuflops.sampler.trace import TraceError, TraceInterval, load_trace

# Gap reasons that are not a failed backend call (nvml.py counts those separately).
_NOT_FAILURES = frozenset({"resync", "tensor_activity_unavailable"})


class ReplaySampler:
    """A Sampler over a recorded trace; the whole file is validated when it is opened."""

    name = "replay"

    def __init__(
        self,
        path: Path,
        *,
        speed: float = 1.0,
        loop: bool = False,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        if speed <= 0:
            raise SamplerError(f"replay speed must be positive, got {speed}")
        try:
            header, intervals, _events = load_trace(path)
        except TraceError as e:
            raise SamplerError(f"cannot replay trace: {e}") from e
        if not intervals:
            raise SamplerError(f"cannot replay trace: {path} has no intervals")
        self.path = path
        self.header = header
        self._intervals: list[TraceInterval] = intervals
        self._speed = speed
        self._loop = loop
        self._clock = clock
        self._stop = stop or threading.Event()
        self._origin = intervals[0].t0_s
        self._span = intervals[-1].t1_s - self._origin
        self._pos = 0
        self._loops = 0
        self._wall_start: float | None = None
        # Backend failures the recording counted, replayed as this sampler's error counters.
        self.errors: dict[tuple[str, str], int] = {}

    def gpus(self) -> list[GpuInfo]:
        return list(self.header.gpus)

    @property
    def interval_s(self) -> float | None:
        return self.header.interval_s

    def describe(self) -> dict[str, Any]:
        """A replay adds nothing to a trace header: the recording's own facts are in its header."""
        return {}

    def sample(self) -> list[GpuSample]:
        if self._pos >= len(self._intervals):
            if not self._loop:
                raise StopIteration
            self._pos = 0
            self._loops += 1
        if self._wall_start is None:
            self._wall_start = self._clock()
        rec = self._intervals[self._pos]
        self._pos += 1
        trace_elapsed = rec.t1_s - self._origin + self._loops * self._span
        due = self._wall_start + trace_elapsed / self._speed
        delay = due - self._clock()
        if delay > 0:
            self._stop.wait(delay)
        shift = self._wall_start - self._origin + self._loops * self._span
        for s in rec.samples:
            if s.error is not None and s.error not in _NOT_FAILURES:
                key = (s.key, s.error)
                self.errors[key] = self.errors.get(key, 0) + 1
        return [_shifted(s, shift) for s in rec.samples]

    def close(self) -> None:
        self._stop.set()


def _shifted(s: GpuSample, shift: float) -> GpuSample:
    return replace(
        s,
        t0_s=s.t0_s + shift,
        t1_s=s.t1_s + shift,
        process_util=tuple(
            ProcessUtilSample(u.pid, u.timestamp_s + shift, u.sm_util) for u in s.process_util
        ),
    )
