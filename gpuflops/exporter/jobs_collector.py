"""Job, program and ledger series: measured beside analytic, reconciliation, thresholds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuflops.compliance.programs import ProgramView
from gpuflops.exporter.state import Snapshot
from gpuflops.jobs.records import RegistrySnapshot
from gpuflops.jobs.server import ServerStats
from gpuflops.ledger.chain import hash_prefix
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger

_PROGRAM_LABELS = {
    "gpuflops_program_flops_total": ("program", "basis"),
    "gpuflops_program_threshold_flops": ("program", "rule"),
    "gpuflops_program_threshold_ratio": ("program",),
    "gpuflops_program_compliance_band_ratio": ("program",),
}


class JobsCollector(Collector):
    """Per-job and per-program series, the job socket's message counts and the ledger's health."""

    def __init__(
        self,
        totals: Callable[[], Snapshot],
        programs: Callable[[], ProgramView],
        registry: Callable[[], RegistrySnapshot],
        sink: LedgerSink,
        socket_stats: Callable[[], ServerStats] | None,
    ) -> None:
        self._totals = totals
        self._programs = programs
        self._registry = registry
        self._sink = sink
        self._socket_stats = socket_stats
        self._ledger_id: str | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self._totals()
        # `job_id`, never `job`: that is Prometheus' scrape-job label (docs/metrics.md).
        labels = ["job_id", "program"]
        active = snap.active_jobs()
        measured = CounterMetricFamily(
            "gpuflops_job_measured_flops", "FLOPs measured for a job's processes", labels=labels
        )
        for (job, program), v in sorted(snap.job_flops.items()):
            if (job, program) in active:
                measured.add_metric([job, program], v)
        yield measured
        analytic = CounterMetricFamily(
            "gpuflops_job_analytic_flops",
            "FLOPs the job reported from its analytic estimate",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "gpuflops_job_analytic_tokens", "Tokens the job reported", labels=labels
        )
        recompute = CounterMetricFamily(
            "gpuflops_job_recompute_flops",
            "Analytic activation-recomputation FLOPs the job reported (part of analytic)",
            labels=labels,
        )
        for (job, program), a in sorted(snap.job_analytic.items()):
            if (job, program) not in active:
                continue
            analytic.add_metric([job, program], a.flops)
            tokens.add_metric([job, program], a.tokens)
            recompute.add_metric([job, program], a.recompute_flops)
        yield analytic
        yield tokens
        yield recompute

        view = self._programs()
        ratio = GaugeMetricFamily(
            "gpuflops_job_reconcile_ratio",
            "Measured / analytic FLOPs over the span the estimates cover",
            labels=labels,
        )
        divergent = GaugeMetricFamily(
            "gpuflops_job_reconcile_divergent",
            "1 when measured and analytic differ beyond the program's tolerance",
            labels=labels,
        )
        prog_families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "gpuflops_program_flops_total": CounterMetricFamily(
                "gpuflops_program_flops",
                "A program's FLOPs on this node, by basis (measured/analytic/compliance)",
                labels=["program", "basis"],
            ),
            "gpuflops_program_threshold_flops": GaugeMetricFamily(
                "gpuflops_program_threshold_flops",
                "The EU AI Act threshold that applies to the program",
                labels=["program", "rule"],
            ),
            "gpuflops_program_threshold_ratio": GaugeMetricFamily(
                "gpuflops_program_threshold_ratio",
                "This node's compliance FLOPs / threshold (cluster-wide: recording rules)",
                labels=["program"],
            ),
            "gpuflops_program_compliance_band_ratio": GaugeMetricFamily(
                "gpuflops_program_compliance_band_ratio",
                "Relative uncertainty of the program's compliance figure (absent: unknown)",
                labels=["program"],
            ),
        }
        hardware = GaugeMetricFamily(
            "gpuflops_job_hardware_flops",
            "A job's measured FLOPs less what its kernel census says half-rate tensor kernels "
            "added (bounded); the compliance basis reads this",
            labels=labels,
        )
        half = GaugeMetricFamily(
            "gpuflops_job_half_rate_fraction",
            "Share of a job's tensor FLOPs its kernel census put on half-rate kernels",
            labels=labels,
        )
        for status in view.statuses.values():
            for r in status.jobs:
                if (r.job, r.program) not in active:
                    continue
                if r.ratio is not None:
                    ratio.add_metric([r.job, r.program], r.ratio)
                divergent.add_metric([r.job, r.program], 1.0 if r.divergent else 0.0)
                hardware.add_metric([r.job, r.program], r.hardware_flops)
                if r.half_rate_fraction is not None:
                    half.add_metric([r.job, r.program], r.half_rate_fraction)
            for name, samples in status.metric_values().items():
                fam = prog_families.get(name)
                if fam is None:
                    continue
                for lab, value in samples:
                    fam.add_metric([lab[k] for k in _PROGRAM_LABELS[name]], value)
        yield ratio
        yield divergent
        yield hardware
        yield half
        yield from prog_families.values()
        errors = GaugeMetricFamily(
            "gpuflops_program_config_error",
            "1 when a program's threshold configuration cannot be applied",
            labels=["program"],
        )
        for program in view.errors:
            errors.add_metric([program], 1.0)
        yield errors

        jobs = GaugeMetricFamily(
            "gpuflops_jobs_registered", "Jobs registered through the socket", labels=["state"]
        )
        counts: dict[str, int] = {"open": 0, "ended": 0}
        for j in self._registry().jobs:
            counts[j.state] = counts.get(j.state, 0) + 1
        for state, n in sorted(counts.items()):
            jobs.add_metric([state], n)
        yield jobs

        if self._socket_stats is not None:
            st = self._socket_stats()
            msgs = CounterMetricFamily(
                "gpuflops_jobsocket_messages", "Job socket messages by result", labels=["result"]
            )
            msgs.add_metric(["ok"], st.messages_ok)
            msgs.add_metric(["error"], st.messages_error)
            yield msgs

        recs = CounterMetricFamily("gpuflops_ledger_records", "Records in the ledger chain")
        recs.add_metric([], self._sink.records)
        yield recs
        werr = CounterMetricFamily(
            "gpuflops_ledger_write_errors", "Ledger commits that failed and were retried"
        )
        werr.add_metric([], self._sink.write_errors)
        yield werr
        pend = GaugeMetricFamily(
            "gpuflops_ledger_pending_intervals", "Intervals measured but not yet durable"
        )
        pend.add_metric([], self._sink.pending_intervals)
        yield pend
        up = GaugeMetricFamily("gpuflops_ledger_enabled", "1 when the ledger persists records")
        up.add_metric([], 0.0 if self._sink.ledger is None else 1.0)
        yield up
        ok = GaugeMetricFamily("gpuflops_ledger_writable",
                               "1 while the ledger commits; 0 while writes fail (disk full)")
        ok.add_metric([], 1.0 if self._sink.writable() else 0.0)
        yield ok
        if self._sink.ledger is not None:
            yield from self._head(self._sink.ledger)

    def _head(self, ledger: Ledger) -> Iterator[Metric]:
        """The chain head, so that Prometheus keeps its history off the node: a chain rewritten
        later no longer has these (seq, hash) pairs (``gpuflops verify --against-prometheus``).
        The hash goes out as its first 52 bits, a float exactly: a label would be a new series
        every record."""
        if self._ledger_id is None:
            self._ledger_id = ledger.ledger_id()
        seq, digest = ledger.head()  # one snapshot: the pair is always consistent
        head = GaugeMetricFamily("gpuflops_ledger_head_seq", "Sequence number of the newest "
                                 "ledger record", labels=["ledger_id"])
        head.add_metric([self._ledger_id], float(seq))
        yield head
        prefix = GaugeMetricFamily(
            "gpuflops_ledger_head_hash_prefix",
            "First 52 bits (13 hex digits) of the newest ledger record's hash, as an integer",
            labels=["ledger_id"])
        prefix.add_metric([self._ledger_id], float(hash_prefix(digest)))
        yield prefix
