"""Cumulative counters fed by the pipeline, read by the exporter as an immutable snapshot.

The sampling thread calls :meth:`Totals.record_interval` and :meth:`Totals.record_attributed`;
a scrape calls :meth:`Totals.snapshot`, which copies under a short lock so a scrape never sees
a half-applied interval. Counters only grow; the ledger seeds them at start so they continue
across restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpuflops.attribution.process import AttributedInterval
from gpuflops.integrate.integrator import IntervalFlops
from gpuflops.model import GpuInfo, GpuSample, Metric

UNATTRIBUTED = "unattributed"

GpuFlopsKey = tuple[str, str, str]  # gpu key, pipe, precision
ProcKey = tuple[str, int, str]  # gpu key, pid, comm
JobKey = tuple[str, str]  # job, program


@dataclass(frozen=True)
class GpuLive:
    """Latest interval of one unit, for gauges."""

    activity: Mapping[Metric, float] | None
    clock_hz: float | None
    flops_per_s: float | None
    t1_s: float
    gpu_util: float | None


@dataclass(frozen=True)
class Snapshot:
    taken_s: float
    gpus: tuple[GpuInfo, ...]
    gpu_flops: Mapping[GpuFlopsKey, float]
    process_flops: Mapping[ProcKey, float]
    unattributed_flops: Mapping[str, float]
    job_flops: Mapping[JobKey, float]
    live: Mapping[str, GpuLive]
    intervals: Mapping[str, int]
    gaps: Mapping[tuple[str, str], int]
    gap_seconds: Mapping[tuple[str, str], float]
    errors: Mapping[tuple[str, str], int]
    last_sample_s: Mapping[str, float]
    held_intervals: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)


JobResolver = Callable[[int], tuple[str, str]]


class Totals:
    def __init__(
        self,
        gpus: list[GpuInfo],
        *,
        process_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        job_resolver: JobResolver | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._gpus = tuple(gpus)
        self._clock = clock
        self._process_ttl_s = process_ttl_s
        self._job_resolver = job_resolver
        self.gpu_flops: dict[GpuFlopsKey, float] = {}
        self.process_flops: dict[ProcKey, float] = {}
        self._process_seen: dict[ProcKey, float] = {}
        self.unattributed: dict[str, float] = {g.key: 0.0 for g in gpus}
        self.job_flops: dict[JobKey, float] = {}
        self._live: dict[str, GpuLive] = {}
        self._intervals: dict[str, int] = {g.key: 0 for g in gpus}
        self._gaps: dict[tuple[str, str], int] = {}
        self._gap_s: dict[tuple[str, str], float] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._last: dict[str, float] = {}
        self._held = 0

    def set_job_resolver(self, resolver: JobResolver | None) -> None:
        self._job_resolver = resolver

    def seed(
        self,
        gpu_flops: Mapping[GpuFlopsKey, float],
        job_flops: Mapping[JobKey, float],
        unattributed: Mapping[str, float],
    ) -> None:
        """Start counters from persisted totals (never lower than what we already hold)."""
        with self._lock:
            for k, v in gpu_flops.items():
                self.gpu_flops[k] = max(self.gpu_flops.get(k, 0.0), v)
            for jk, v in job_flops.items():
                self.job_flops[jk] = max(self.job_flops.get(jk, 0.0), v)
            for gk, v in unattributed.items():
                self.unattributed[gk] = max(self.unattributed.get(gk, 0.0), v)

    def record_interval(self, sample: GpuSample, flops: IntervalFlops) -> None:
        with self._lock:
            key = sample.key
            self._intervals[key] = self._intervals.get(key, 0) + 1
            self._last[key] = sample.t1_s
            if flops.gap_reason is not None:
                gk = (key, flops.gap_reason)
                self._gaps[gk] = self._gaps.get(gk, 0) + 1
                self._gap_s[gk] = self._gap_s.get(gk, 0.0) + max(0.0, flops.duration_s)
            for (pipe, precision), value in flops.flops.items():
                fk = (key, pipe.value, precision)
                self.gpu_flops[fk] = self.gpu_flops.get(fk, 0.0) + value
            dt = flops.duration_s
            self._live[key] = GpuLive(
                activity=sample.activity,
                clock_hz=sample.clock_hz,
                flops_per_s=(flops.total / dt) if flops.gap_reason is None and dt > 0 else None,
                t1_s=sample.t1_s,
                gpu_util=sample.gpu_util,
            )

    def record_attributed(self, items: list[AttributedInterval], held: int) -> list[
        tuple[AttributedInterval, list[tuple[str, str, int | None]]]
    ]:
        """Add settled shares; return each interval with the (job, program, pid) of its shares."""
        out = []
        now = self._clock()
        with self._lock:
            self._held = held
            for item in items:
                jobs: list[tuple[str, str, int | None]] = []
                for share in item.shares:
                    if share.pid is None:
                        self.unattributed[item.key] = (
                            self.unattributed.get(item.key, 0.0) + share.flops
                        )
                        job: JobKey = (UNATTRIBUTED, UNATTRIBUTED)
                    else:
                        pk = (item.key, share.pid, share.comm)
                        self.process_flops[pk] = self.process_flops.get(pk, 0.0) + share.flops
                        self._process_seen[pk] = now
                        job = self._resolve(share.pid)
                    self.job_flops[job] = self.job_flops.get(job, 0.0) + share.flops
                    jobs.append((job[0], job[1], share.pid))
                out.append((item, jobs))
            self._age_out(now)
        return out

    def _resolve(self, pid: int) -> JobKey:
        if self._job_resolver is None:
            return (UNATTRIBUTED, UNATTRIBUTED)
        try:
            return self._job_resolver(pid)
        except Exception:  # a resolver bug must not stop metering; count it
            self._errors[("*", "job_resolver")] = self._errors.get(("*", "job_resolver"), 0) + 1
            return (UNATTRIBUTED, UNATTRIBUTED)

    def _age_out(self, now: float) -> None:
        stale = [k for k, seen in self._process_seen.items() if now - seen > self._process_ttl_s]
        for k in stale:
            del self._process_seen[k]
            del self.process_flops[k]

    def count_errors(self, errors: Mapping[tuple[str, str], int]) -> None:
        """Replace backend error counters with the backend's cumulative view."""
        with self._lock:
            for k, v in errors.items():
                self._errors[k] = max(self._errors.get(k, 0), v)

    def snapshot(self, extra: Mapping[str, object] | None = None) -> Snapshot:
        with self._lock:
            return Snapshot(
                taken_s=self._clock(),
                gpus=self._gpus,
                gpu_flops=MappingProxyType(dict(self.gpu_flops)),
                process_flops=MappingProxyType(dict(self.process_flops)),
                unattributed_flops=MappingProxyType(dict(self.unattributed)),
                job_flops=MappingProxyType(dict(self.job_flops)),
                live=MappingProxyType(dict(self._live)),
                intervals=MappingProxyType(dict(self._intervals)),
                gaps=MappingProxyType(dict(self._gaps)),
                gap_seconds=MappingProxyType(dict(self._gap_s)),
                errors=MappingProxyType(dict(self._errors)),
                last_sample_s=MappingProxyType(dict(self._last)),
                held_intervals=self._held,
                extra=MappingProxyType(dict(extra or {})),
            )
