"""FlopsCollector over a real MetricsServer fed by the demo trace: the metric-name contract."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from gpuflops.exporter.collector import AttributionCollector, FlopsCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.exporter.state import Totals
from gpuflops.model import GpuInfo, GpuSample
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler
from gpuflops.pipeline.pipeline import CountingSink, Pipeline
from gpuflops.sampler.trace import load_trace
from tests.support import ROOT, FakeClock, demo_trace

CONTRACTS = ROOT / "docs" / "CONTRACTS.md"
_HEADER, _INTERVALS, _ = demo_trace()
INFO = _HEADER.gpus[0]
SAMPLES = [iv.samples[0] for iv in _INTERVALS]
# Series that other collectors own (jobs_collector.py: jobs, programs, job socket, ledger;
# AttributionCollector: attribution, tested on a shared trace below).
NOT_OURS = ("gpuflops_job_", "gpuflops_program_", "gpuflops_jobsocket_", "gpuflops_ledger_",
            "gpuflops_attribution_", "gpuflops_central_", "gpuflops_fleet_")


def contract() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) for every series of docs/CONTRACTS.md this collector owns."""
    out = {}
    for line in CONTRACTS.read_text().splitlines():
        m = re.match(r"\| `(gpuflops_\w+)` \| (counter|gauge) \| (.*) \|$", line)
        if not m or m.group(1).startswith(NOT_OURS):
            continue
        labels = {re.sub(r"\(.*?\)", "", x).strip() for x in m.group(3).split(",")}
        out[m.group(1)] = (m.group(2), {x for x in labels if x})
    return out


class Node:
    """Pipeline -> Totals -> FlopsCollector -> MetricsServer, stepped by the test."""

    def __init__(self, gpus: list[GpuInfo] | None = None, ttl_s: float = 300.0) -> None:
        self.clock = FakeClock(1000.0)
        self.gpus = gpus or [INFO]
        self.totals = Totals(self.gpus, process_ttl_s=ttl_s, clock=self.clock)
        self.pipeline = Pipeline(self.gpus, Integrator(), ProcessAttributor(), Labeler(), CountingSink(),
                                 self.totals)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FlopsCollector(self.totals.snapshot, "replay"))
        self.server = MetricsServer(self.registry, "127.0.0.1:0", lambda: (True, "ok"))
        self.server.start()

    def step(self, samples: list[GpuSample]) -> None:
        for s in samples:
            self.pipeline.step([s])

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
            text = r.read().decode()
        self.types = {f.name: f.type for f in text_string_to_metric_families(text)}
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.server.stop()


Labels = tuple[tuple[str, str], ...]


def _values(scrape: dict[tuple[str, Labels], float], name: str) -> dict[Labels, float]:
    return {labels: v for (n, labels), v in scrape.items() if n == name}


def test_contract_table_is_parsed() -> None:
    c = contract()
    assert len(c) == 16
    assert c["gpuflops_gpu_flops_total"] == ("counter", {"gpu", "uuid", "pipe", "precision"})
    assert c["gpuflops_build_info"] == ("gauge", {"version", "backend"})


def test_every_contract_series_is_exported_with_its_labels(node: Node) -> None:
    samples = list(SAMPLES[:200])
    samples[100] = replace(samples[100], activity=None, error="timeout")  # one gap
    # The last interval counted by CUPTI PM sampling (real clock, tensor cycles): run 21's H200.
    samples[199] = replace(samples[199], counter_source="cupti_pm", counter_span_s=0.1,
                           sm_cycles=1.342e8, tensor_cycles=2.0e10)
    node.step(samples)
    node.totals.count_errors({("0", "timeout"): 1})
    scrape = node.scrape()
    for name, (kind, labels) in contract().items():
        series = _values(scrape, name)
        assert series, f"{name} missing from /metrics"
        for lbl in series:
            assert {k for k, _ in lbl} == labels, name
        family = name[: -len("_total")] if kind == "counter" else name
        assert node.types[family] == kind, name
    assert _values(scrape, "gpuflops_sampler_gaps_total") == {(("gpu", "0"), ("reason", "timeout")): 1.0}
    gap_s = _values(scrape, "gpuflops_sampler_gap_seconds_total")
    assert list(gap_s.values()) == [pytest.approx(samples[100].duration_s)]
    assert _values(scrape, "gpuflops_sampler_intervals_total") == {(("gpu", "0"),): 200.0}
    assert _values(scrape, "gpuflops_gpu_counter_intervals_total") == {
        (("gpu", "0"), ("source", "cupti_pm")): 1.0, (("gpu", "0"), ("source", "nvml")): 199.0}
    assert _values(scrape, "gpuflops_gpu_sm_clock_real_hz") == {
        (("gpu", "0"), ("uuid", INFO.uuid)): pytest.approx(1.342e9)}
    assert _values(scrape, "gpuflops_sampler_errors_total") == {(("gpu", "0"), ("kind", "timeout")): 1.0}


def test_counter_values_equal_the_integrated_trace(node: Node) -> None:
    node.step(SAMPLES)
    node.pipeline.flush()
    scrape = node.scrape()
    integ = Integrator()
    expected = sum(integ.integrate(INFO, s).total for s in SAMPLES)
    gpu = sum(_values(scrape, "gpuflops_gpu_flops_total").values())
    assert gpu == pytest.approx(expected, rel=1e-9)
    assert gpu > 4e16  # ~a minute of H100 GEMMs (4.3e16)
    procs = _values(scrape, "gpuflops_process_flops_total")
    unattr = sum(_values(scrape, "gpuflops_unattributed_flops_total").values())
    assert sum(procs.values()) + unattr == pytest.approx(gpu, rel=1e-9)
    pids = {dict(k)["pid"] for k in procs}
    assert pids == {"458", "1470", "1471"}
    assert {dict(k)["comm"] for k in procs} == {"python3"}
    last = _values(scrape, "gpuflops_sampler_last_sample_timestamp_seconds")
    assert last == {(("gpu", "0"),): SAMPLES[-1].t1_s}
    assert _values(scrape, "gpuflops_build_info")[(("backend", "replay"), ("version", "0.1.0"))] == 1.0


def test_counters_never_decrease_across_scrapes(node: Node) -> None:
    prev: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    grew = 0
    for i in range(0, len(SAMPLES), 100):
        node.step(SAMPLES[i : i + 100])
        cur = node.scrape()
        for key, v in cur.items():
            if key[0].endswith("_total") and key in prev:
                assert v >= prev[key], key
                grew += v > prev[key]
        gone = [k for k in prev if k[0].endswith("_total") and k not in cur]
        assert gone == []
        prev = cur
    assert grew > 20


def test_live_gauges_follow_the_last_interval(node: Node) -> None:
    busy = max(SAMPLES, key=lambda s: Integrator().integrate(INFO, s).total)
    node.step([busy])
    scrape = node.scrape()
    f = Integrator().integrate(INFO, busy)
    labels = (("gpu", "0"), ("uuid", INFO.uuid))
    rate = _values(scrape, "gpuflops_gpu_flops_per_second")[labels]
    assert rate == pytest.approx(f.total / busy.duration_s)
    assert _values(scrape, "gpuflops_gpu_sm_clock_hz")[labels] == busy.clock_hz
    act = _values(scrape, "gpuflops_gpu_activity_ratio")
    assert busy.activity is not None
    assert act[(("gpu", "0"), ("metric", "hmma"), ("uuid", INFO.uuid))] == busy.activity[next(
        m for m in busy.activity if m.value == "hmma")]
    assert len(act) == 9
    # A gap clears the rate: no number is better than a stale one.
    node.step([replace(busy, activity=None, error="gpu_lost")])
    scrape = node.scrape()
    assert _values(scrape, "gpuflops_gpu_flops_per_second") == {}
    assert _values(scrape, "gpuflops_gpu_activity_ratio") == {}


def test_unit_without_tensor_activity_exports_reason() -> None:
    no_gpm = replace(INFO, metrics=frozenset(), unavailable_reason="GPM not supported on this ampere GPU")
    n = Node([no_gpm])
    try:
        n.step([replace(s, activity=None, error="tensor_activity_unavailable") for s in SAMPLES[:20]])
        scrape = n.scrape()
    finally:
        n.server.stop()
    avail = _values(scrape, "gpuflops_gpu_tensor_activity_available")
    assert avail == {
        (("gpu", "0"), ("reason", "GPM not supported on this ampere GPU"), ("uuid", INFO.uuid)): 0.0
    }
    assert sum(_values(scrape, "gpuflops_gpu_flops_total").values()) == 0.0
    gaps = _values(scrape, "gpuflops_sampler_gaps_total")
    assert gaps == {(("gpu", "0"), ("reason", "tensor_activity_unavailable")): 20.0}


def test_process_series_age_out_after_ttl() -> None:
    n = Node(ttl_s=30.0)
    try:
        bf16_busy = [s for s in SAMPLES if s.processes and s.processes[0].pid == 458][:50]
        n.step(bf16_busy)
        assert {dict(k)["pid"] for k in _values(n.scrape(), "gpuflops_process_flops_total")} == {"458"}
        idle = [s for s in SAMPLES if not s.processes][:5]
        n.clock.t += 29.0
        n.step(idle[:1])
        assert _values(n.scrape(), "gpuflops_process_flops_total") != {}
        n.clock.t += 2.0  # 31 s since pid 458 last got FLOPs
        n.step(idle[1:2])
        scrape = n.scrape()
        assert _values(scrape, "gpuflops_process_flops_total") == {}
        assert sum(_values(scrape, "gpuflops_gpu_flops_total").values()) > 0  # GPU counters stay
    finally:
        n.server.stop()


def test_attribution_series_on_a_real_shared_trace() -> None:
    """AttributionCollector over run 13's two-process trace: the shared-interval counts and the
    FLOPs measured while the GPU was time-sliced, as scraped from a real server."""
    header, intervals, _ = load_trace(ROOT / "tests" / "data" / "h100-shared-reporting.jsonl.gz")
    gpus = header.gpus
    totals = Totals(gpus, clock=FakeClock(1000.0))
    att = ProcessAttributor(hold_s=3.0)
    pipeline = Pipeline(gpus, Integrator(), att, Labeler(), CountingSink(), totals)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AttributionCollector(
        lambda: dict(att.stats), lambda: dict(att.timesliced_flops), {g.key: g.uuid for g in gpus}
    ))
    server = MetricsServer(registry, "127.0.0.1:0", lambda: (True, "ok"))
    server.start()
    try:
        for iv in intervals:
            pipeline.step(list(iv.samples))
        pipeline.flush()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.stop()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    sliced = _values(got, "gpuflops_attribution_timesliced_flops_total")
    assert sliced == {(("gpu", gpus[0].key), ("uuid", gpus[0].uuid)): pytest.approx(
        att.timesliced_flops[gpus[0].key])}
    assert next(iter(sliced.values())) > 1e15  # three time-sliced scenarios of 6 s each
    split = _values(got, "gpuflops_attribution_shared_intervals_total")
    assert split[(("method", "sm_util"),)] == att.stats["sm_util"] > 0
    assert sum(split.values()) == sum(att.stats[m] for m in ("analytic", "sm_util", "no_util_data"))
