"""Central-store series: a node's shipping health (daemon) and fleet-wide program figures
(``gpuflops central serve``). Both read an immutable snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuflops.compliance.fleet_status import FleetSnapshot
from gpuflops.ledger.ship import ShipStatus


class ShipCollector(Collector):
    """``gpuflops_central_*``: this node's shipping to the central store."""

    def __init__(self, status: Callable[[], ShipStatus], clock: Callable[[], float]) -> None:
        self._status = status
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        lag = GaugeMetricFamily(
            "gpuflops_central_ship_lag_seconds",
            "Age of the oldest ledger record not yet in the central store (0 when caught up)")
        lag.add_metric([], st.lag_s(self._clock()))
        yield lag
        backlog = GaugeMetricFamily(
            "gpuflops_central_backlog_records",
            "Ledger records not yet in the central store (they wait in the local ledger)")
        backlog.add_metric([], st.backlog_records)
        yield backlog
        shipped = CounterMetricFamily(
            "gpuflops_central_shipped_records", "Ledger records this daemon shipped")
        shipped.add_metric([], st.shipped_records)
        yield shipped
        errors = CounterMetricFamily(
            "gpuflops_central_ship_errors", "Failed shipping rounds by kind", labels=["kind"])
        for kind, n in sorted(st.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        forks = CounterMetricFamily(
            "gpuflops_central_forks",
            "Forks found: the central store anchors a record this ledger no longer has")
        forks.add_metric([], st.forks)
        yield forks
        fenced = GaugeMetricFamily(
            "gpuflops_central_fenced", "1 when shipping stopped for this ledger (fails closed)")
        fenced.add_metric([], 0.0 if st.fenced is None else 1.0)
        yield fenced
        if st.last_success_s is not None:
            ok = GaugeMetricFamily("gpuflops_central_last_success_timestamp_seconds",
                                   "When the last shipping round succeeded")
            ok.add_metric([], st.last_success_s)
            yield ok


class FleetCollector(Collector):
    """``gpuflops_fleet_*``: program totals and node health from the central store."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        flops = CounterMetricFamily(
            "gpuflops_fleet_program_flops",
            "A program's FLOPs over every node and cluster that ever ran it, by basis",
            labels=["program", "basis"])
        threshold = GaugeMetricFamily(
            "gpuflops_fleet_program_threshold_flops", "The threshold that applies to the program",
            labels=["program", "rule"])
        ratio = GaugeMetricFamily(
            "gpuflops_fleet_program_threshold_ratio",
            "Fleet-wide compliance FLOPs / threshold", labels=["program", "rule"])
        nodes = GaugeMetricFamily(
            "gpuflops_fleet_program_nodes", "Node ledgers that hold records of the program",
            labels=["program"])
        decided = GaugeMetricFamily(
            "gpuflops_fleet_program_decision",
            "1 for the outcome of the program's latest recorded decision",
            labels=["program", "outcome"])
        for p in snap.programs:
            for basis, v in sorted(p.flops_by_basis.items()):
                flops.add_metric([p.program, basis], v)
            threshold.add_metric([p.program, p.rule], p.threshold_flops)
            ratio.add_metric([p.program, p.rule], p.ratio)
            nodes.add_metric([p.program], p.nodes)
            if p.decision is not None:
                decided.add_metric([p.program, p.decision], 1.0)
        yield from (flops, threshold, ratio, nodes, decided)
        errors = GaugeMetricFamily(
            "gpuflops_fleet_program_error",
            "1 when a program cannot be evaluated (its journal fails verification or its "
            "definition cannot be applied)", labels=["program"])
        for program in sorted(snap.errors):
            errors.add_metric([program], 1.0)
        yield errors
        ingest = GaugeMetricFamily(
            "gpuflops_fleet_node_last_ingest_timestamp_seconds",
            "When the central store last accepted records from the node", labels=["node", "cluster"])
        newest = GaugeMetricFamily(
            "gpuflops_fleet_node_last_record_timestamp_seconds",
            "Time of the newest record the node shipped", labels=["node", "cluster"])
        records = CounterMetricFamily(
            "gpuflops_fleet_node_records", "Raw ledger records the node's current ledger shipped",
            labels=["node", "cluster"])
        fenced = GaugeMetricFamily(
            "gpuflops_fleet_node_fenced", "1 when the node's ledger is fenced after a fork",
            labels=["node", "cluster"])
        for n in snap.nodes:
            labels = [n.node, n.cluster]
            if n.last_ingest_s is not None:
                ingest.add_metric(labels, n.last_ingest_s)
            if n.last_record_s is not None:
                newest.add_metric(labels, n.last_record_s)
            records.add_metric(labels, n.shipped_raw_records)
            fenced.add_metric(labels, 1.0 if n.fenced else 0.0)
        yield from (ingest, newest, records, fenced)
        forks = GaugeMetricFamily("gpuflops_fleet_forks", "Forks recorded in the central store")
        forks.add_metric([], snap.forks)
        yield forks
        up = GaugeMetricFamily("gpuflops_fleet_up",
                               "1 when the last read of the central store succeeded")
        up.add_metric([], 1.0 if snap.up else 0.0)
        yield up
        if snap.refreshed_s is not None:
            refreshed = GaugeMetricFamily("gpuflops_fleet_refresh_timestamp_seconds",
                                          "When the exported figures were read from the store")
            refreshed.add_metric([], snap.refreshed_s)
            yield refreshed
