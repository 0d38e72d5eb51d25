"""The Sampler protocol, and the plumbing the hardware backends (NVML, DCGM) share.

Shared plumbing: every library call goes through :func:`library_call`, which maps the library's
errors to a :class:`CallError` with a stable ``kind`` and tolerates functions an older library
lacks; :class:`ErrorCounts` counts failures per unit and kind and logs the first of each as a
warning (later ones at debug); :func:`unit_info` builds a unit's :class:`GpuInfo` with the one key
convention; :func:`wait_until` and :func:`next_deadline` pace sampling on a fixed grid.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from gpuflops.model import GpuInfo, GpuSample, Metric


class SamplerError(Exception):
    """A backend cannot start or continue at all (no driver, unreadable trace, ...)."""


@runtime_checkable
class Sampler(Protocol):
    """One small interface between the hardware and the rest of the pipeline."""

    name: str

    @property
    def interval_s(self) -> float | None:
        """Nominal sampling interval; None when a recorded trace does not say."""
        ...

    @property
    def errors(self) -> Mapping[tuple[str, str], int]:
        """Cumulative backend failures by (unit key, kind), for sampler_errors_total."""
        ...

    def gpus(self) -> list[GpuInfo]:
        """Units this sampler measures (whole GPUs or MIG GPU instances)."""
        ...

    def sample(self) -> list[GpuSample]:
        """Block until the current interval ends; return one sample per unit.

        A unit whose counters could not be read this interval yields a sample with
        ``activity=None`` and ``error`` set: a gap, never zeros. Raises StopIteration when a
        finite source (a trace) is exhausted or the sampler's stop token is set.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for a trace header (driver and library versions, host); {} when none."""
        ...

    def close(self) -> None:
        """Release handles; safe to call twice."""
        ...


class CallError(Exception):
    """A library call failed; ``kind`` is stable across driver and library versions."""

    def __init__(self, function: str, kind: str, code: int | None, message: str) -> None:
        super().__init__(f"{function}: {message}")
        self.function = function
        self.kind = kind
        self.code = code


def error_kinds(library: ModuleType, names: Mapping[str, str]) -> dict[int, str]:
    """The library's error codes -> stable kinds, for the constants this version defines."""
    return {getattr(library, n): k for n, k in names.items() if hasattr(library, n)}


def library_call(
    library: ModuleType,
    library_error: type[BaseException],
    kinds: Mapping[int, str],
    error: type[CallError],
    missing: str,
    function: str,
    *args: Any,
) -> Any:
    """Call ``library.<function>(*args)``, mapping every failure to ``error`` (a CallError)."""
    fn = getattr(library, function, None)
    if fn is None:
        raise error(function, "function_not_found", None, missing)
    try:
        return fn(*args)
    except library_error as e:
        code = getattr(e, "value", None)
        kind = kinds.get(code, "unknown") if isinstance(code, int) else "unknown"
        raise error(function, kind, code, str(e)) from None


class ErrorCounts:
    """Backend failures by (unit key, kind): each counted, the first of a kind logged as a
    warning for that unit, later ones at debug."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self.counts: dict[tuple[str, str], int] = {}
        self._warned: set[tuple[str, str]] = set()

    def count(self, unit_key: str, kind: str, message: str) -> None:
        key = (unit_key, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning("gpu %s: %s (further occurrences at debug)", unit_key, message)
        else:
            self._log.debug("gpu %s: %s", unit_key, message)


def unit_key(index: int, gpu_instance_id: int | None) -> str:
    """A unit's stable label: "0" for GPU 0, "0/gi1" for GPU instance 1 on GPU 0."""
    return str(index) if gpu_instance_id is None else f"{index}/gi{gpu_instance_id}"


def unit_info(
    index: int,
    uuid: str,
    name: str,
    architecture: str,
    sm_count: int | None,
    metrics: frozenset[Metric],
    unavailable_reason: str | None,
    gpu_instance_id: int | None = None,
) -> GpuInfo:
    """A whole GPU's or a MIG instance's GpuInfo, keyed by :func:`unit_key`."""
    return GpuInfo(
        key=unit_key(index, gpu_instance_id),
        index=index,
        uuid=uuid,
        name=name,
        architecture=architecture,
        sm_count=sm_count,
        gpu_instance_id=gpu_instance_id,
        metrics=metrics,
        unavailable_reason=unavailable_reason,
    )


def wait_until(
    deadline: float,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    stop: threading.Event,
    period_s: float,
    tick: Callable[[], None] | None = None,
) -> None:
    """Sleep until ``deadline`` in steps of at most ``period_s``, calling ``tick`` each step.

    Raises StopIteration once ``stop`` is set (seen within one period).
    """
    while True:
        now = clock()
        if now >= deadline:
            return
        if tick is not None:
            tick()
        # time.sleep, not Event.wait: it costs less CPU per wake-up, and a stop is seen
        # within one period.
        sleep(max(0.0, min(deadline, now + period_s) - clock()))
        if stop.is_set():
            raise StopIteration


def next_deadline(candidate: float, clock: Callable[[], float], interval_s: float) -> float:
    """``candidate``, unless sampling fell behind it (a stalled call): then restart the grid
    one interval from now rather than burst-sampling."""
    now = clock()
    return candidate if candidate > now else now + interval_s


def host_facts() -> dict[str, Any]:
    """Host name and pid, for trace headers."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}
