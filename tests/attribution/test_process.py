"""ProcessAttributor on real H100 traces: nothing dropped, and the split's measured limits."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuflops.attribution.process import AttributedInterval, ProcessAttributor
from gpuflops.integrate.integrator import Integrator, IntervalFlops
from gpuflops.model import GpuInfo, GpuSample
from gpuflops.sampler.trace import TraceEvent, TraceInterval, load_trace

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "gpuflops" / "data" / "h100-demo.jsonl.gz"
SCENARIOS = ROOT / "tests" / "data" / "h100-attribution-scenarios.jsonl.gz"

_CACHE: dict[Path, tuple[GpuInfo, list[TraceInterval], list[TraceEvent]]] = {}


def _trace(path: Path) -> tuple[GpuInfo, list[TraceInterval], list[TraceEvent]]:
    if path not in _CACHE:
        h, iv, ev = load_trace(path)
        _CACHE[path] = (h.gpus[0], iv, ev)
    return _CACHE[path]


def _run(path: Path, att: ProcessAttributor) -> tuple[list[IntervalFlops], list[AttributedInterval]]:
    info, intervals, _ = _trace(path)
    integ = Integrator()
    inputs, settled = [], []
    for iv in intervals:
        for s in iv.samples:
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


def _scenario_ratios(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per scenario: (pid, attributed / true), normalised by the GPU's measured total."""
    _inputs, settled = _run(path, ProcessAttributor())
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
