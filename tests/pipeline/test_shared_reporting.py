"""The analytic split on a real H100 trace where the sharing processes reported their FLOPs.

tests/data/h100-shared-reporting.jsonl.gz is benchmarks/h100_accuracy.py's run 13 (docs/accuracy.md):
four two-process scenarios, each worker's exact FLOPs after every synchronisation (about 50 ms)
stored as its ``series``. The reports a JobReporter sent (sums flushed every 0.5 s from the first
add) are rebuilt from those series; the daemon's own split in that run read the same figures.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.trace import load_trace

TRACE = Path(__file__).parents[2] / "tests" / "data" / "h100-shared-reporting.jsonl.gz"


def _reports(processes: list[dict[str, Any]]) -> list[tuple[float, int, float]]:
    out = []
    for p in processes:
        series = p["series"]
        flush, acc = series[0][0] + 0.5, 0.0
        for t, flops in series:
            while t > flush:
                if acc:
                    out.append((flush, p["pid"], acc))
                    acc = 0.0
                flush += 0.5
            acc += flops
        out.append((flush, p["pid"], acc))
    return sorted(out)


Split = tuple[dict[str, dict[int | None, float]], dict[str, list[dict[str, Any]]], ProcessAttributor]


def _split(hold_s: float = 3.0) -> Split:
    header, intervals, events = load_trace(TRACE)
    info = header.gpus[0]
    scenarios: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.data.get("shared"):
            scenarios[e.data["scenario"]].append(dict(e.data))
    reports = _reports([p for name, ps in scenarios.items() if "reporting" in name for p in ps])
    att = ProcessAttributor(hold_s=hold_s)
    integ = Integrator()
    settled = []
    for iv in intervals:
        for s in iv.samples:
            while reports and reports[0][0] <= s.t1_s:
                t, pid, flops = reports.pop(0)
                att.record_analytic(pid, t, flops)
            settled.extend(att.add(s, integ.integrate(info, s)))
    settled.extend(att.flush())
    got: dict[str, dict[int | None, float]] = {}
    for name, ps in scenarios.items():
        lo, hi = min(p["t0"] for p in ps) - 1.0, max(p["t1"] for p in ps) + 1.0
        by_pid: dict[int | None, float] = defaultdict(float)
        for a in settled:
            if a.t1_s > lo and a.t0_s < hi:
                for sh in a.shares:
                    by_pid[sh.pid] += sh.flops
        got[name] = by_pid
    return got, scenarios, att


def test_reported_shares_match_the_true_proportions() -> None:
    got, scenarios, att = _split()
    assert att.stats["analytic"] >= 60
    for name in ("staggered_reporting", "mlp_fp32_reporting", "staggered_mps_reporting"):
        ps = scenarios[name]
        measured = sum(v for k, v in got[name].items() if k is not None)
        true = sum(p["flops"] for p in ps)
        for p in ps:
            share = got[name][p["pid"]] / measured
            assert share == pytest.approx(p["flops"] / true, abs=0.01), (name, p["name"])


def test_attributed_over_true_as_measured_in_run_13() -> None:
    """Attributed / true per process. Time-sliced, the GPU total itself reads 5-12% high while
    contexts switch (docs/accuracy.md), and the process that only ran shared carries all of it;
    under MPS the total is right and so is each process. The daemon read, live in that run:
    1.039/1.100, 1.037/1.055, 0.993/1.012; replayed here with reports rebuilt from the workers'
    series (flush times approximated), within 0.02 of those."""
    got, scenarios, _att = _split()
    expect = {
        "staggered_reporting": (1.041, 1.092),
        "mlp_fp32_reporting": (1.037, 1.067),
        "staggered_mps_reporting": (1.013, 1.011),
    }
    for name, (want_a, want_b) in expect.items():
        a, b = scenarios[name]
        assert got[name][a["pid"]] / a["flops"] == pytest.approx(want_a, abs=0.01), name
        assert got[name][b["pid"]] / b["flops"] == pytest.approx(want_b, abs=0.01), name


def test_without_reports_the_utilisation_split_misses_by_a_fifth() -> None:
    """The same pair, not reporting: the SM-utilisation split (a documented limit)."""
    got, scenarios, _att = _split()
    a, b = scenarios["staggered_silent"]
    assert got["staggered_silent"][a["pid"]] / a["flops"] == pytest.approx(1.132, abs=0.02)
    assert got["staggered_silent"][b["pid"]] / b["flops"] == pytest.approx(0.800, abs=0.02)


def test_time_sliced_flops_are_flagged_and_mps_is_not() -> None:
    """Intervals in which the driver saw both processes running are flagged as time-sliced (the
    condition in which the total reads high, docs/accuracy.md) and their FLOPs counted per GPU.
    Under MPS the driver names only its server, so nothing is flagged. Per-process samples are
    point samples, so the flagged span matches the 6 s overlap within about one interval."""
    _got, scenarios, att = _split()
    header, intervals, _events = load_trace(TRACE)
    settled = []
    integ = Integrator()
    fresh = ProcessAttributor(hold_s=3.0)
    for iv in intervals:
        for s in iv.samples:
            settled.extend(fresh.add(s, integ.integrate(header.gpus[0], s)))
    settled.extend(fresh.flush())
    flagged = sum(sh.flops for a in settled if a.timesliced for sh in a.shares)
    assert flagged > 0
    assert sum(fresh.timesliced_flops.values()) == pytest.approx(flagged, rel=1e-9)
    # Analytic reports change how an interval is split, not whether it was time-sliced.
    assert sum(att.timesliced_flops.values()) == pytest.approx(flagged, rel=1e-9)
    for name, ps in scenarios.items():
        a, b = ps  # B joins A for 6 s
        lo, hi = min(p["t0"] for p in ps) - 1.0, max(p["t1"] for p in ps) + 1.0
        span = sum(x.t1_s - x.t0_s for x in settled if x.timesliced and x.t1_s > lo and x.t0_s < hi)
        overlap = min(a["t1"], b["t1"]) - max(a["t0"], b["t0"])
        if "mps" in name:
            assert span == 0, name
        else:
            assert span == pytest.approx(overlap, abs=1.0), name
