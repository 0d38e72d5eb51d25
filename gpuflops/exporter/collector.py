"""Prometheus collector over an immutable :class:`gpuflops.exporter.state.Snapshot` taken at scrape time.

Series are listed in docs/metrics.md; names and labels are the contract rules and dashboards
rely on (docs/CONTRACTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuflops import __version__
from gpuflops.exporter.state import Snapshot


class FlopsCollector(Collector):
    """GPU, process and sampler-health series."""

    def __init__(self, snapshot: Callable[[], Snapshot], backend: str) -> None:
        self._snapshot = snapshot
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        uuid = {g.key: g.uuid for g in snap.gpus}

        info = GaugeMetricFamily(
            "gpuflops_build_info", "gpuflops version and sampler backend", labels=["version", "backend"]
        )
        info.add_metric([__version__, self._backend], 1)
        yield info

        flops = CounterMetricFamily(
            "gpuflops_gpu_flops",
            "Floating-point operations executed, from hardware activity counters",
            labels=["gpu", "uuid", "pipe", "precision"],
        )
        for (key, pipe, precision), v in sorted(snap.gpu_flops.items()):
            flops.add_metric([key, uuid.get(key, ""), pipe, precision], v)
        yield flops

        proc = CounterMetricFamily(
            "gpuflops_process_flops",
            "FLOPs attributed to a compute process (series age out after the process exits)",
            labels=["gpu", "pid", "comm"],
        )
        for (key, pid, comm), v in sorted(snap.process_flops.items()):
            proc.add_metric([key, str(pid), comm], v)
        yield proc

        unattr = CounterMetricFamily(
            "gpuflops_unattributed_flops",
            "FLOPs that could not be attributed to a process",
            labels=["gpu"],
        )
        for key, v in sorted(snap.unattributed_flops.items()):
            unattr.add_metric([key], v)
        yield unattr

        activity = GaugeMetricFamily(
            "gpuflops_gpu_activity_ratio",
            "Pipe activity over the last interval (0-1)",
            labels=["gpu", "uuid", "metric"],
        )
        clock = GaugeMetricFamily(
            "gpuflops_gpu_sm_clock_hz", "Mean SM clock NVML reported over the last interval",
            labels=["gpu", "uuid"]
        )
        real_clock = GaugeMetricFamily(
            "gpuflops_gpu_sm_clock_real_hz",
            "The SMs' clock from their own elapsed cycles (CUPTI PM) over the last interval",
            labels=["gpu", "uuid"],
        )
        source = GaugeMetricFamily(
            "gpuflops_gpu_counter_source",
            "1 for the source of the last interval's cycles: cupti_pm (hardware cycle counters) "
            "or nvml (NVML's reported clock)",
            labels=["gpu", "uuid", "source"],
        )
        rate = GaugeMetricFamily(
            "gpuflops_gpu_flops_per_second",
            "FLOP rate over the last measured interval",
            labels=["gpu", "uuid"],
        )
        util = GaugeMetricFamily(
            "gpuflops_gpu_utilization_ratio",
            "NVML utilization.gpu (share of time any kernel ran); NOT a FLOPs measure",
            labels=["gpu", "uuid"],
        )
        for key, live in sorted(snap.live.items()):
            labels = [key, uuid.get(key, "")]
            if live.activity is not None:
                for metric, value in sorted(live.activity.items(), key=lambda kv: kv[0].value):
                    activity.add_metric([*labels, metric.value], value)
            if live.clock_hz is not None:
                clock.add_metric(labels, live.clock_hz)
            if live.real_clock_hz is not None:
                real_clock.add_metric(labels, live.real_clock_hz)
            source.add_metric([*labels, live.counter_source], 1)
            if live.flops_per_s is not None:
                rate.add_metric(labels, live.flops_per_s)
            if live.gpu_util is not None:
                util.add_metric(labels, live.gpu_util)
        yield activity
        yield clock
        yield real_clock
        yield source
        yield rate
        yield util

        available = GaugeMetricFamily(
            "gpuflops_gpu_tensor_activity_available",
            "1 when the unit reports tensor activity; 0 with the reason when it cannot",
            labels=["gpu", "uuid", "reason"],
        )
        for g in snap.gpus:
            available.add_metric(
                [g.key, g.uuid, g.unavailable_reason or ""], 1 if g.metrics else 0
            )
        yield available

        intervals = CounterMetricFamily(
            "gpuflops_sampler_intervals", "Sampling intervals processed", labels=["gpu"]
        )
        for key, n in sorted(snap.intervals.items()):
            intervals.add_metric([key], n)
        yield intervals
        by_source = CounterMetricFamily(
            "gpuflops_gpu_counter_intervals",
            "Intervals integrated with each cycle source (cupti_pm or nvml)",
            labels=["gpu", "source"],
        )
        for (key, src), n in sorted(snap.source_intervals.items()):
            by_source.add_metric([key, src], n)
        yield by_source

        gaps = CounterMetricFamily(
            "gpuflops_sampler_gaps",
            "Intervals that could not be measured (never integrated as zero)",
            labels=["gpu", "reason"],
        )
        gap_s = CounterMetricFamily(
            "gpuflops_sampler_gap_seconds",
            "Time that could not be measured",
            labels=["gpu", "reason"],
        )
        for (key, reason), n in sorted(snap.gaps.items()):
            gaps.add_metric([key, reason], n)
            gap_s.add_metric([key, reason], snap.gap_seconds.get((key, reason), 0.0))
        yield gaps
        yield gap_s

        errors = CounterMetricFamily(
            "gpuflops_sampler_errors", "Backend call failures by kind", labels=["gpu", "kind"]
        )
        for (key, kind), n in sorted(snap.errors.items()):
            errors.add_metric([key, kind], n)
        yield errors

        last = GaugeMetricFamily(
            "gpuflops_sampler_last_sample_timestamp_seconds",
            "End of the last interval sampled",
            labels=["gpu"],
        )
        for key, t in sorted(snap.last_sample_s.items()):
            last.add_metric([key], t)
        yield last

        held = GaugeMetricFamily(
            "gpuflops_attribution_held_intervals",
            "Intervals waiting for per-process utilisation samples before they are split",
        )
        held.add_metric([], snap.held_intervals)
        yield held


class AttributionCollector(Collector):
    """How shared-GPU intervals were split, why the analytic split was passed over, and how
    many FLOPs were measured while processes time-sliced a GPU."""

    def __init__(
        self,
        stats: Callable[[], dict[str, int]],
        timesliced: Callable[[], dict[str, float]],
        uuids: Mapping[str, str],
    ) -> None:
        self._stats = stats
        self._timesliced = timesliced
        self._uuids = dict(uuids)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        split = CounterMetricFamily(
            "gpuflops_attribution_shared_intervals",
            "Intervals of a GPU shared by several processes, by how they were split",
            labels=["method"],
        )
        for method in ("analytic", "sm_util", "no_util_data"):
            split.add_metric([method], stats.get(method, 0))
        yield split
        skipped = CounterMetricFamily(
            "gpuflops_attribution_analytic_skipped",
            "Shared intervals not split by the jobs' analytic reports, by reason",
            labels=["reason"],
        )
        for reason in ("not_all_publish", "not_covered", "implausible"):
            skipped.add_metric([reason], stats.get(f"analytic_{reason}", 0))
        yield skipped
        sliced = CounterMetricFamily(
            "gpuflops_attribution_timesliced_flops",
            "Measured FLOPs of intervals in which the driver saw two or more processes running "
            "kernels on the GPU (time-slicing; reads high, see docs/accuracy.md)",
            labels=["gpu", "uuid"],
        )
        # Every GPU from the start, at 0 until it is time-sliced, so its share reads 0, not absent.
        flops = {**dict.fromkeys(self._uuids, 0.0), **self._timesliced()}
        for key in sorted(flops):
            sliced.add_metric([key, self._uuids.get(key, "")], flops[key])
        yield sliced
