"""ProcessAttributor on real H100 traces: nothing dropped, and the split's measured limits."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuflops.model import (
    AttributedInterval,
    GpuInfo,
    GpuSample,
    IntervalFlops,
    ProcessInfo,
    ProcessUtilSample,
)
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.trace import TraceEvent, TraceInterval
from tests.support import DEMO_TRACE, ROOT, trace

DEMO = DEMO_TRACE
SCENARIOS = ROOT / "tests" / "data" / "h100-attribution-scenarios.jsonl.gz"

def _trace(path: Path) -> tuple[GpuInfo, tuple[TraceInterval, ...], tuple[TraceEvent, ...]]:
    header, intervals, events = trace(path)
    return header.gpus[0], intervals, events


def _run(
    path: Path, att: ProcessAttributor, reports: list[tuple[float, int, float]] | None = None
) -> tuple[list[IntervalFlops], list[AttributedInterval]]:
    """Feed the trace; ``reports`` (time, pid, flops) reach the attributor when their time comes."""
    info, intervals, _ = _trace(path)
    integ = Integrator()
    inputs, settled = [], []
    pending = sorted(reports or [])
    for iv in intervals:
        for s in iv.samples:
            while pending and pending[0][0] <= s.t1_s:
                t, pid, flops = pending.pop(0)
                att.record_analytic(pid, t, flops)
            f = integ.integrate(info, s)
            inputs.append(f)
            settled.extend(att.add(s, f))
    settled.extend(att.flush())
    assert att.held() == 0
    return inputs, settled


def _sample_with(n_procs: int) -> tuple[GpuInfo, GpuSample, IntervalFlops]:
    """A busy real interval whose sample lists ``n_procs`` processes."""
    info, intervals, _ = _trace(SCENARIOS)
    integ = Integrator()
    for iv in intervals:
        s = iv.samples[0]
        f = integ.integrate(info, s)
        if len(s.processes) == n_procs and f.total > 1e13:
            return info, s, f
    raise AssertionError(f"no busy interval with {n_procs} processes")


def test_single_process_gets_everything() -> None:
    _info, s, f = _sample_with(1)
    (out,) = ProcessAttributor().add(s, f)
    assert out.method == "single"
    pid = s.processes[0].pid
    assert {sh.pid for sh in out.shares} == {pid}
    assert {sh.comm for sh in out.shares} == {"python3"}
    assert sum(sh.flops for sh in out.shares) == f.total
    assert {(sh.pipe, sh.precision) for sh in out.shares} == {k for k, v in f.flops.items() if v}


def test_no_process_seen_is_unattributed() -> None:
    _info, s, f = _sample_with(1)
    (out,) = ProcessAttributor().add(replace(s, processes=()), f)
    assert out.method == "none_seen"
    assert {sh.pid for sh in out.shares} == {None}
    assert sum(sh.flops for sh in out.shares) == f.total


def test_idle_interval_has_no_shares() -> None:
    info, intervals, events = _trace(DEMO)
    (idle,) = [e.data for e in events if e.data["kind"] == "idle"]
    s = next(x for iv in intervals for x in iv.samples if x.t0_s >= idle["t0"])
    (out,) = ProcessAttributor().add(s, Integrator().integrate(info, s))
    assert out.method == "idle" and out.shares == ()


@pytest.mark.parametrize("path", [SCENARIOS, DEMO], ids=["scenarios", "demo"])
def test_every_interval_settles_once_and_shares_sum_to_its_flops(path: Path) -> None:
    inputs, settled = _run(path, ProcessAttributor())
    assert [(a.key, a.t0_s) for a in settled] == [(f.key, f.t0_s) for f in inputs]  # in order
    methods: dict[str, int] = defaultdict(int)
    for f, a in zip(inputs, settled, strict=True):
        methods[a.method] += 1
        got = sum(sh.flops for sh in a.shares)
        assert got == pytest.approx(f.total, rel=1e-12, abs=0.0)
        by_pipe: dict[tuple[Any, str], float] = defaultdict(float)
        for sh in a.shares:
            assert sh.flops > 0
            by_pipe[(sh.pipe, sh.precision)] += sh.flops
        for k, v in f.flops.items():
            assert by_pipe.get(k, 0.0) == pytest.approx(v, rel=1e-12)
    assert methods["sm_util"] > 50 and methods["single"] > 500
    total_in = sum(f.total for f in inputs)
    total_out = sum(sh.flops for a in settled for sh in a.shares)
    assert total_out == pytest.approx(total_in, rel=1e-12)


def test_shared_intervals_are_held_until_util_samples_can_have_arrived() -> None:
    _info, intervals, _ = _trace(SCENARIOS)
    att = ProcessAttributor(hold_s=4.0, smooth_s=0.5)
    integ = Integrator()
    info = _trace(SCENARIOS)[0]
    samples = [iv.samples[0] for iv in intervals]
    first_shared = next(
        i for i, s in enumerate(samples) if len(s.processes) > 1 and integ.integrate(info, s).total > 0
    )
    for s in samples[:first_shared]:
        att.add(s, integ.integrate(info, s))
    assert att.held() == 0
    shared = samples[first_shared]
    assert att.add(shared, integ.integrate(info, shared)) == []
    assert att.held() == 1
    # Later intervals queue behind it (order is kept) until hold_s has passed.
    released: list[AttributedInterval] = []
    i = first_shared + 1
    while not released:
        s = samples[i]
        released = att.add(s, integ.integrate(info, s))
        i += 1
    assert released[0].t0_s == shared.t0_s
    assert samples[i - 1].t1_s - shared.t1_s >= 4.0
    assert samples[i - 2].t1_s - shared.t1_s < 4.0
    held = att.held()
    assert held > 0
    flushed = att.flush()
    assert len(flushed) == held and att.held() == 0
    assert [a.t0_s for a in flushed] == [s.t0_s for s in samples[i - held : i]]


def test_hold_must_cover_smoothing() -> None:
    with pytest.raises(ValueError, match="hold_s must cover smooth_s"):
        ProcessAttributor(hold_s=0.2, smooth_s=0.5)
    ProcessAttributor(hold_s=0.5, smooth_s=0.5)


def test_shared_interval_without_util_samples_is_unattributed() -> None:
    _info, s, f = _sample_with(2)
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    assert att.add(replace(s, process_util=()), f) == []
    (out,) = att.flush()
    assert out.method == "no_util_data"
    assert {sh.pid for sh in out.shares} == {None}
    assert sum(sh.flops for sh in out.shares) == pytest.approx(f.total, rel=1e-12)


def _scenario_ratios(
    path: Path, att: ProcessAttributor | None = None, reports: list[tuple[float, int, float]] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """Per scenario: (pid, attributed / true), normalised by the GPU's measured total."""
    _inputs, settled = _run(path, att or ProcessAttributor(), reports)
    _info, _iv, events = _trace(path)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.data.get("shared"):
            groups[str(e.data.get("scenario", "staggered"))].append(dict(e.data))
    out = {}
    for name, phases in groups.items():
        lo = min(p["t0"] for p in phases) - 1
        hi = max(p["t1"] for p in phases) + 1
        by_pid: dict[int | None, float] = defaultdict(float)
        for a in settled:
            if a.t1_s > lo and a.t0_s < hi:
                for sh in a.shares:
                    by_pid[sh.pid] += sh.flops
        assert by_pid.get(None, 0.0) == 0.0  # nothing left unattributed in these scenarios
        measured = sum(by_pid.values())
        true = sum(p["flops"] for p in phases)
        out[name] = [(p["pid"], by_pid[p["pid"]] / (p["flops"] * measured / true)) for p in phases]
    return out


def test_staggered_two_process_run_splits_within_three_percent() -> None:
    """Run 1 (demo trace): a big bf16 GEMM joined 3 s later by a mid-size one."""
    (ratios,) = _scenario_ratios(DEMO).values()
    assert [pid for pid, _ in ratios] == [1470, 1471]
    assert ratios[0][1] == pytest.approx(1.003, abs=0.03)
    assert ratios[1][1] == pytest.approx(0.991, abs=0.03)


def test_documented_limitation_sm_util_split_misattributes_unequal_kernels() -> None:
    """NOT a pass of the +-10% attribution target: regression bounds on measured reality.

    Splitting by per-process SM utilisation assumes equal FLOPs per busy SM-second. Recorded on
    an H100 (tests/data/h100-attribution-scenarios.jsonl.gz), normalised by the GPU total:
    same_shape 1.05/0.82, small_vs_big 1.63/0.60, mlp_vs_fp32 0.86/8.2 (an fp32 GEMM keeps its
    SMs "busy" at a fifteenth of the tensor rate). docs/attribution.md must say so; a change to
    the split that moves these numbers must update this test on purpose.
    """
    r = _scenario_ratios(SCENARIOS)
    assert sorted(r) == ["mlp_vs_fp32", "same_shape", "small_vs_big"]
    expect = {
        "same_shape": [(2096, 1.054), (2097, 0.815)],
        "small_vs_big": [(2540, 1.625), (2541, 0.600)],
        "mlp_vs_fp32": [(2977, 0.855), (2978, 8.206)],
    }
    for name, want in expect.items():
        got = r[name]
        assert [pid for pid, _ in got] == [pid for pid, _ in want]
        for (_pid, g), (_p, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=0.03), (name, got)


def _reports_from_truth(
    path: Path, scale: dict[int, float] | None = None, only: set[int] | None = None
) -> list[tuple[float, int, float]]:
    """What a JobReporter in each worker would have sent, every 0.5 s, rebuilt from the truth.

    The traces hold each worker's exact total, not its time course. In each staggered pair the
    process that runs throughout (A) ran alone before and after its neighbour (B): there it is
    given the rate its shape reached alone in the same trace's solo phase, and the rest of its
    count is spread over the shared span; B's count is spread evenly over its run.
    """
    events = [e.data for e in _trace(path)[2] if e.data.get("kind") == "phase"]
    solo = {d["name"]: d["flops"] / (d["t1"] - d["t0"]) for d in events if not d.get("shared")}
    shared = sorted((d for d in events if d.get("shared")), key=lambda d: d["t0"])
    segments: list[tuple[int, float, float, float]] = []  # pid, t0, t1, flops
    for a, b in zip(shared[::2], shared[1::2], strict=True):
        rate = solo[a["name"]]
        alone = (b["t0"] - a["t0"]) + (a["t1"] - b["t1"])
        segments += [
            (a["pid"], a["t0"], b["t0"], rate * (b["t0"] - a["t0"])),
            (a["pid"], b["t0"], b["t1"], a["flops"] - rate * alone),
            (a["pid"], b["t1"], a["t1"], rate * (a["t1"] - b["t1"])),
            (b["pid"], b["t0"], b["t1"], b["flops"]),
        ]
    out = []
    for pid, t0, t1, flops in segments:
        if only is not None and pid not in only:
            continue
        n = max(1, round((t1 - t0) / 0.5))
        step = (t1 - t0) / n
        each = flops / n * (scale or {}).get(pid, 1.0)
        out += [(t0 + (i + 1) * step, pid, each) for i in range(n)]
    return out


def test_analytic_split_follows_the_processes_reports() -> None:
    """With every sharing process reporting, even a tensor-core vs FP32 pair splits close to
    its true proportions (the per-process SM-utilisation split gave the FP32 process 8.2x its
    FLOPs). The 10% bound is the rebuilt reports' own uncertainty (A's rate while alone is
    taken from another phase); benchmarks/h100_accuracy.py measures the split with real reports.
    """
    for path in (SCENARIOS, DEMO):
        att = ProcessAttributor()
        r = _scenario_ratios(path, att, _reports_from_truth(path))
        for name, got in r.items():
            for pid, ratio in got:
                if pid == 2978:
                    # 6% of the pair's FLOPs: 3% of error in A's rebuilt reports is 50% of its own.
                    assert 0.5 < ratio < 2.0, got
                else:
                    assert ratio == pytest.approx(1.0, abs=0.10), (name, got)
        assert att.stats["analytic"] > 40
        assert att.stats["analytic_implausible"] < att.stats["analytic"] / 10  # edges


def test_analytic_split_falls_back_when_a_running_process_does_not_report() -> None:
    quiet = 2097  # same_shape's second process: it runs but reports nothing
    att = ProcessAttributor()
    r = _scenario_ratios(SCENARIOS, att, _reports_from_truth(SCENARIOS, only={2096, 2540, 2541}))
    assert att.stats["analytic_not_all_publish"] > 5
    # same_shape falls back to the SM-utilisation split (its documented figures) ...
    assert dict(r["same_shape"])[quiet] == pytest.approx(0.815, rel=0.05)
    # ... and the pair that both reported still splits by their reports.
    for _pid, ratio in r["small_vs_big"]:
        assert ratio == pytest.approx(1.0, abs=0.03)


def test_analytic_split_refuses_reports_far_from_the_measurement() -> None:
    """A process claiming a tenth of its work cannot push the rest onto its neighbour."""
    att = ProcessAttributor(analytic_tolerance=0.5)
    under = {2097: 0.1, 2541: 0.1, 2978: 0.1}
    r = _scenario_ratios(SCENARIOS, att, _reports_from_truth(SCENARIOS, scale=under))
    assert att.stats["analytic_implausible"] > 10
    assert dict(r["same_shape"])[2097] > 0.5  # the SM-utilisation split, not 0.1


def test_analytic_split_can_be_turned_off() -> None:
    att = ProcessAttributor(analytic=False)
    r = _scenario_ratios(SCENARIOS, att, _reports_from_truth(SCENARIOS))
    assert att.stats["analytic"] == 0
    assert dict(r["mlp_vs_fp32"])[2978] == pytest.approx(8.206, rel=0.03)


def _two_process_sample() -> tuple[GpuSample, IntervalFlops, int, int]:
    _info, s, f = _sample_with(2)
    a, b = (p.pid for p in s.processes)
    return s, f, a, b


def _per_window(f: IntervalFlops) -> float:
    """A first report covers the 0.5 s before it; sent 0.3 s after a <= 0.2 s interval, this
    much of it falls in the interval."""
    assert f.t1_s - f.t0_s <= 0.2
    return 0.5 / (f.t1_s - f.t0_s)


def test_analytic_split_and_processes_that_stopped_reporting() -> None:
    s, f, a, b = _two_process_sample()
    # The driver saw both running (point samples, as an H100 reports them when polled often).
    ran_both = replace(s, process_util=(
        ProcessUtilSample(a, f.t1_s - 0.05, 0.99), ProcessUtilSample(b, f.t1_s, 0.99)
    ))
    # b went quiet 2 s before the interval but the driver still sees it running: its work is
    # unreported, so the reports cannot split this interval.
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    att.record_analytic(a, f.t1_s + 0.2, 3e12)
    att.record_analytic(b, f.t0_s - 2.0, 1e12)
    assert att.add(ran_both, f) == []
    (out,) = att.flush()
    assert out.method == "sm_util" and att.stats["analytic_not_covered"] == 1
    # b's last report just before the interval: the samples may still show its last kernels
    # (1 s windows), and it reported nothing after, so a gets all of it.
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    att.record_analytic(a, f.t1_s + 0.3, f.total * _per_window(f))
    att.record_analytic(b, f.t0_s - 0.5, 1e12)
    att.add(ran_both, f)
    (out,) = att.flush()
    assert out.method == "analytic" and {x.pid for x in out.shares} == {a}

    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    t = f.t1_s + 0.3
    ratio = 1.0 / 3.0
    per_window = _per_window(f)
    att.record_analytic(a, t, f.total * (1 - ratio) * per_window)
    att.record_analytic(b, t, f.total * ratio * per_window)
    att.add(ran_both, f)
    (out,) = att.flush()
    assert out.method == "analytic"
    got = {pid: sum(x.flops for x in out.shares if x.pid == pid) for pid in (a, b)}
    assert got[b] / f.total == pytest.approx(ratio, rel=1e-9)
    assert sum(got.values()) == pytest.approx(f.total, rel=1e-12)


def test_analytic_split_ignores_the_mps_server_and_needs_samples_for_silent_processes() -> None:
    s, f, a, b = _two_process_sample()
    server = ProcessInfo(77, "nvidia-cuda-mps")
    under_mps = replace(s, processes=(*s.processes, server), process_util=())
    t = f.t1_s + 0.3
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    att.record_analytic(a, t, f.total / 2 * _per_window(f))
    att.record_analytic(b, t, f.total / 2 * _per_window(f))
    att.add(under_mps, f)
    (out,) = att.flush()
    assert out.method == "analytic"
    assert {x.pid for x in out.shares} == {a, b}
    # A silent process that the driver never sampled might have done the work: no analytic split.
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    att.record_analytic(a, t, f.total * _per_window(f))
    att.add(replace(s, process_util=()), f)
    (out,) = att.flush()
    assert out.method == "no_util_data" and att.stats["analytic_not_all_publish"] == 1


def test_reports_of_processes_long_quiet_are_forgotten() -> None:
    """Report history is bounded: a pid silent for a history (60 s) is dropped, not kept forever."""
    s, f, a, b = _two_process_sample()
    att = ProcessAttributor(hold_s=1.0, smooth_s=0.5)
    att.record_analytic(a, f.t0_s - 100.0, 1e12)
    att.record_analytic(b, f.t0_s - 99.0, 1e12)
    att.record_analytic(b, f.t1_s + 0.3, 1e12)
    att.add(s, f)
    att.flush()
    assert set(att._reports) == {b}
    assert [w.end_s for w in att._reports[b]] == [f.t1_s + 0.3]
