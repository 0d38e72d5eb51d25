"""Cumulative counters fed by the pipeline, read by the exporter as an immutable snapshot.

Only the pipeline writes them (gpuflops/pipeline/pipeline.py). FLOPs counters grow only from
rows the ledger has committed (or directly when running without a ledger), and start from the
ledger's totals: so after a restart, even a ``kill -9``, they continue from where the durable
record stands and never go backwards. (A counter that fell
back a little would look like a reset to Prometheus and be counted again in full.)

Per-process and unattributed series are not persisted; after a restart they start at zero,
which Prometheus handles as an ordinary reset.

Series age out so that a node's series count stays bounded (docs/metrics.md, "Series budget"):
a process's series ``process_ttl_s`` after its last FLOP (dropped here), a job's
``series_ttl_s`` after its last measured FLOP or estimate (kept here, so that a job that comes
back continues its counter, but no longer exported; its totals stay in the ledger and in the
program series).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpuflops.ledger.records import LedgerTotals
from gpuflops.model import (
    COUNTER_SOURCE_NVML,
    UNATTRIBUTED,
    FlopsRow,
    GpuInfo,
    GpuSample,
    IntervalFlops,
    Metric,
)

GpuFlopsKey = tuple[str, str, str]  # gpu key, pipe, precision
ProcKey = tuple[str, int, str]  # gpu key, pid, comm
JobSeriesKey = tuple[str, str]  # job, program


@dataclass(frozen=True)
class JobAnalytic:
    flops: float = 0.0
    tokens: float = 0.0
    recompute_flops: float = 0.0


@dataclass(frozen=True)
class GpuLive:
    """Latest interval of one unit, for gauges."""

    activity: Mapping[Metric, float] | None
    clock_hz: float | None
    flops_per_s: float | None
    t1_s: float
    gpu_util: float | None
    counter_source: str = COUNTER_SOURCE_NVML
    real_clock_hz: float | None = None  # the SMs' own cycles over the interval, when counted


@dataclass(frozen=True)
class Snapshot:
    taken_s: float
    gpus: tuple[GpuInfo, ...]
    gpu_flops: Mapping[GpuFlopsKey, float]
    process_flops: Mapping[ProcKey, float]
    unattributed_flops: Mapping[str, float]
    job_flops: Mapping[JobSeriesKey, float]
    job_analytic: Mapping[JobSeriesKey, JobAnalytic]
    live: Mapping[str, GpuLive]
    intervals: Mapping[str, int]
    source_intervals: Mapping[tuple[str, str], int]  # (gpu key, counter source) -> intervals
    gaps: Mapping[tuple[str, str], int]
    gap_seconds: Mapping[tuple[str, str], float]
    errors: Mapping[tuple[str, str], int]
    last_sample_s: Mapping[str, float]
    held_intervals: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)
    # When each job last had a measured FLOP or an estimate, and how long it stays exported.
    job_seen: Mapping[JobSeriesKey, float] = field(default_factory=dict)
    series_ttl_s: float = float("inf")

    def active_jobs(self) -> frozenset[JobSeriesKey]:
        """Jobs whose series are exported: seen within ``series_ttl_s``, and the unattributed
        pseudo-job always."""
        keys = set(self.job_flops) | set(self.job_analytic)
        return frozenset(k for k in keys if k == (UNATTRIBUTED, UNATTRIBUTED)
                         or self.taken_s - self.job_seen.get(k, float("-inf")) <= self.series_ttl_s)


class Totals:
    def __init__(
        self,
        gpus: list[GpuInfo],
        *,
        process_ttl_s: float = 300.0,
        series_ttl_s: float = float("inf"),
        clock: Callable[[], float] = time.time,
        seed: LedgerTotals | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._gpus = tuple(gpus)
        self._clock = clock
        self._process_ttl_s = process_ttl_s
        self._series_ttl_s = series_ttl_s
        self._job_seen: dict[JobSeriesKey, float] = {}
        self._gpu_flops: dict[GpuFlopsKey, float] = {}
        self._process_flops: dict[ProcKey, float] = {}
        self._process_seen: dict[ProcKey, float] = {}
        self._unattributed: dict[str, float] = {g.key: 0.0 for g in gpus}
        self._job_flops: dict[JobSeriesKey, float] = {}
        self._job_analytic: dict[JobSeriesKey, JobAnalytic] = {}
        self._live: dict[str, GpuLive] = {}
        self._intervals: dict[str, int] = {g.key: 0 for g in gpus}
        self._source_intervals: dict[tuple[str, str], int] = {}
        self._gaps: dict[tuple[str, str], int] = {}
        self._gap_s: dict[tuple[str, str], float] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._last: dict[str, float] = {}
        self._held = 0
        if seed is not None:  # start from the persisted totals
            self._gpu_flops.update({(k.gpu, k.pipe, k.precision): v for k, v in seed.gpu.items()})
            self._job_flops.update({(k.job, k.program): v.measured_flops for k, v in seed.jobs.items()})
            self._job_analytic.update({
                (k.job, k.program): JobAnalytic(v.analytic_flops, v.tokens, v.recompute_flops)
                for k, v in seed.jobs.items()
            })
            # A restart restores the jobs' last activity too, so ended jobs stay aged out.
            self._job_seen.update({(k.job, k.program): v.last_t_s for k, v in seed.jobs.items()
                                   if v.last_t_s is not None})

    def record_live(self, sample: GpuSample, flops: IntervalFlops) -> None:
        """Gauges and sampler health for one interval (immediately, not after the ledger)."""
        with self._lock:
            key = sample.key
            self._intervals[key] = self._intervals.get(key, 0) + 1
            sk = (key, sample.counter_source)
            self._source_intervals[sk] = self._source_intervals.get(sk, 0) + 1
            self._last[key] = sample.t1_s
            if flops.gap_reason is not None:
                gk = (key, flops.gap_reason)
                self._gaps[gk] = self._gaps.get(gk, 0) + 1
                self._gap_s[gk] = self._gap_s.get(gk, 0.0) + max(0.0, flops.duration_s)
            dt = flops.duration_s
            self._live[key] = GpuLive(
                activity=sample.activity,
                clock_hz=sample.clock_hz,
                flops_per_s=(flops.total / dt) if flops.gap_reason is None and dt > 0 else None,
                t1_s=sample.t1_s,
                gpu_util=sample.gpu_util,
                counter_source=sample.counter_source,
                real_clock_hz=sample.real_clock_hz,
            )

    def add_rows(self, rows: Iterable[FlopsRow], held: int) -> None:
        """Count rows that are now durable."""
        now = self._clock()
        with self._lock:
            self._held = held
            # Sum per job first and then add, in the same order as the ledger's own totals
            # (ledger/schema.py, apply_interval), so a restart seeded from the ledger gets bit-identical
            # values: a counter one rounding step lower would read as a reset in Prometheus.
            per_job: dict[JobSeriesKey, float] = {}
            for r in rows:
                gk = (r.gpu, r.pipe, r.precision)
                self._gpu_flops[gk] = self._gpu_flops.get(gk, 0.0) + r.flops
                jk = (r.job, r.program)
                per_job[jk] = per_job.get(jk, 0.0) + r.flops
                if r.pid is None:
                    self._unattributed[r.gpu] = self._unattributed.get(r.gpu, 0.0) + r.flops
                else:
                    pk = (r.gpu, r.pid, r.comm)
                    self._process_flops[pk] = self._process_flops.get(pk, 0.0) + r.flops
                    self._process_seen[pk] = now
            for jk, v in per_job.items():
                self._job_flops[jk] = self._job_flops.get(jk, 0.0) + v
                self._job_seen[jk] = now
            stale = [k for k, t in self._process_seen.items() if now - t > self._process_ttl_s]
            for k in stale:
                del self._process_seen[k]
                del self._process_flops[k]

    def add_estimate(self, job: str, program: str, flops: float, tokens: float, recompute: float) -> None:
        with self._lock:
            k = (job, program)
            a = self._job_analytic.get(k, JobAnalytic())
            self._job_analytic[k] = JobAnalytic(
                a.flops + flops, a.tokens + tokens, a.recompute_flops + recompute
            )
            self._job_seen[k] = self._clock()

    def count_errors(self, errors: Mapping[tuple[str, str], int]) -> None:
        """Take the backend's cumulative error counters."""
        with self._lock:
            for k, v in errors.items():
                self._errors[k] = max(self._errors.get(k, 0), v)

    def count_error(self, gpu: str, kind: str) -> None:
        with self._lock:
            self._errors[(gpu, kind)] = self._errors.get((gpu, kind), 0) + 1

    def snapshot(self, extra: Mapping[str, object] | None = None) -> Snapshot:
        with self._lock:
            return Snapshot(
                taken_s=self._clock(),
                gpus=self._gpus,
                gpu_flops=MappingProxyType(dict(self._gpu_flops)),
                process_flops=MappingProxyType(dict(self._process_flops)),
                unattributed_flops=MappingProxyType(dict(self._unattributed)),
                job_flops=MappingProxyType(dict(self._job_flops)),
                job_analytic=MappingProxyType(dict(self._job_analytic)),
                live=MappingProxyType(dict(self._live)),
                intervals=MappingProxyType(dict(self._intervals)),
                source_intervals=MappingProxyType(dict(self._source_intervals)),
                gaps=MappingProxyType(dict(self._gaps)),
                gap_seconds=MappingProxyType(dict(self._gap_s)),
                errors=MappingProxyType(dict(self._errors)),
                last_sample_s=MappingProxyType(dict(self._last)),
                held_intervals=self._held,
                extra=MappingProxyType(dict(extra or {})),
                job_seen=MappingProxyType(dict(self._job_seen)),
                series_ttl_s=self._series_ttl_s,
            )
