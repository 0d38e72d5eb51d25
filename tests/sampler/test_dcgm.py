"""DcgmSampler against a fake of DCGM's bindings, driven by the trace recorded on an H100."""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflops.model import GpuInfo, GpuSample, Metric
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.base import SamplerError
from gpuflops.sampler.dcgm.bindings import parse_endpoint
from gpuflops.sampler.dcgm.sampler import DcgmSampler
from gpuflops.sampler.nvml import NvmlSampler
from tests.support import DEMO_TRACE, FakeClock, demo_trace

HERE = Path(__file__).parent
FAKE_DIR = HERE / "fake_dcgm"
TRACE = DEMO_TRACE
sys.path.insert(0, str(FAKE_DIR))
sys.path.insert(0, str(HERE))

import dcgm_fake_engine as fe  # noqa: E402
import dcgm_structs as ds  # noqa: E402
import fake_nvml  # noqa: E402


@dataclass
class Rig:
    clock: FakeClock
    engine: fe.FakeHostEngine
    start: float
    end: float


def _rig(**gpu_kw: object) -> Rig:
    timeline, _ = fe.timeline_from_trace(TRACE)
    start, end = timeline.rows[0][0], timeline.rows[-1][1]
    clock = FakeClock(start)
    gpu = fe.FakeGpu(0, "NVIDIA H100 80GB HBM3", "GPU-fake-0", "hopper", timeline, **gpu_kw)  # type: ignore[arg-type]
    engine = fe.FakeHostEngine([gpu], clock)
    fe.install(engine)
    return Rig(clock, engine, start, end)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = _rig()
    yield r
    fe.install(None)


def _dcgm(r: Rig, **kw: object) -> DcgmSampler:
    args: dict[str, object] = {
        "bindings_paths": [FAKE_DIR],
        "clock": r.clock,
        "sleep": r.clock.sleep,
        "stop": threading.Event(),
        "reconnect_s": 1.0,
    }
    args.update(kw)
    return DcgmSampler(**args)  # type: ignore[arg-type]


def _run(s: DcgmSampler | NvmlSampler, until: float) -> list[GpuSample]:
    out: list[GpuSample] = []
    while True:
        batch = s.sample()
        out.extend(batch)
        if batch[-1].t1_s >= until:
            return out


def _contiguous(samples: list[GpuSample]) -> None:
    for a, b in itertools.pairwise(samples):
        assert b.t0_s == pytest.approx(a.t1_s, abs=1e-6), (a, b)


# ---------------------------------------------------------------- acceptance: DCGM == GPM

_HMMA = {"bf16", "fp16", "tf32", "fp8"}


def _precision_at(phases: list[dict[str, object]], t: float) -> str:
    for p in phases:
        if float(p["t0"]) <= t <= float(p["t1"]):  # type: ignore[arg-type]
            d = str(p["dtype"])
            return d if d in _HMMA else "bf16"
    return "bf16"


def _flops(
    samples: list[GpuSample], info: GpuInfo, phases: list[dict[str, object]], a: float, b: float
) -> float:
    integrators = {p: Integrator(lambda _k, p=p: p) for p in _HMMA}
    total = 0.0
    for s in samples:
        overlap = min(b, s.t1_s) - max(a, s.t0_s)
        if overlap <= 0 or s.duration_s <= 0:
            continue
        prec = _precision_at(phases, (s.t0_s + s.t1_s) / 2)
        total += integrators[prec].integrate(info, s).total * overlap / s.duration_s
    return total


def test_dcgm_matches_gpm_on_recorded_h100_workload(rig: Rig) -> None:
    header, _, events = demo_trace()
    phases = [e.data for e in events if e.data.get("kind") == "phase"]
    info = header.gpus[0]

    nv_clock = FakeClock(rig.start)
    fake, _ = fake_nvml.from_trace(TRACE, nv_clock, rig.start)
    nv = NvmlSampler(nvml=fake, clock=nv_clock, sleep=nv_clock.sleep, stop=threading.Event())  # type: ignore[arg-type]
    gpm = _run(nv, rig.end)
    nv.close()

    dc = _dcgm(rig)
    assert dc.gpus()[0].sm_count == 132
    dcgm = _run(dc, rig.end)
    dc.close()
    assert all(s.activity is not None for s in dcgm), {s.error for s in dcgm}
    _contiguous(dcgm)
    # DCGM's windows end on its own grid (37 ms into each 100 ms), ~39 ms off the GPM grid:
    # the two backends do not integrate identical intervals.
    assert all(abs(round(s.t1_s * 1e6) % 100_000 - 37_000) <= 1 for s in dcgm)
    assert all(abs(round(s.t1_s * 1e6) % 100_000 - 37_000) > 20_000 for s in gpm[:5])

    windows = [
        (str(p["name"]) + ("_shared" if p.get("shared") else ""), float(p["t0"]), float(p["t1"]))  # type: ignore[arg-type]
        for p in phases
    ]
    windows.append(("whole", rig.start + 0.5, rig.end - 0.5))
    ratios = {}
    for name, a, b in windows:
        g = _flops(gpm, info, phases, a, b)
        d = _flops(dcgm, info, phases, a, b)
        assert g > 1e14, name
        ratios[name] = d / g
    print("dcgm/gpm:", {k: round(v, 5) for k, v in ratios.items()})
    for name, r in ratios.items():
        assert abs(r - 1) <= 0.005, (name, r)


# ---------------------------------------------------------------- failures at the boundary


def _busy(samples: list[GpuSample], a: float, b: float) -> list[GpuSample]:
    return [s for s in samples if a <= s.t0_s and s.t1_s <= b]


BF16 = (1795349636.5, 1795349643.5)  # inside the recorded bf16 phase


def _mean(samples: list[GpuSample], m: Metric) -> float:
    vals = [x.activity[m] for x in samples if x.activity is not None]
    assert vals
    return sum(vals) / len(vals)


def test_profiling_unavailable_reports_reason_and_gaps_not_zeros() -> None:
    r = _rig(prof_error=ds.DCGM_ST_PROFILING_NOT_SUPPORTED)
    try:
        s = _dcgm(r)
        info = s.gpus()[0]
        assert info.metrics == frozenset()
        assert "profiling not available (profiling_not_supported)" in (info.unavailable_reason or "")
        out = _run(s, BF16[1])
        s.close()
    finally:
        fe.install(None)
    assert all(x.activity is None and x.error == "tensor_activity_unavailable" for x in out)
    busy = _busy(out, *BF16)
    assert busy and all(x.clock_hz and x.clock_hz > 1e9 for x in busy)  # the clock still reads
    _contiguous(out)


def test_field_not_supported_leaves_pipe_unmeasured() -> None:
    # A GPU whose DCGM offers tensor_active but not the HMMA/IMMA/DFMA split (Volta, Turing).
    r = _rig(prof_fields=frozenset({1002, 1003, 1004, 1006, 1007, 1008}))
    try:
        s = _dcgm(r)
        info = s.gpus()[0]
        assert Metric.HMMA not in info.metrics and Metric.TENSOR_ANY in info.metrics
        out = _busy(_run(s, BF16[1]), *BF16)
        s.close()
    finally:
        fe.install(None)
    assert all(x.activity is not None and Metric.HMMA not in x.activity for x in out)
    assert _mean(out, Metric.TENSOR_ANY) > 0.8
    flops = [Integrator().integrate(info, x) for x in out]
    assert all("hmma" in [p.value for p in f.unmeasured_pipes] for f in flops)


def test_host_engine_gone_then_back(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    s = _dcgm(rig)
    out = _run(s, rig.start + 3.0)
    rig.engine.kill()
    with caplog.at_level(logging.WARNING, "gpuflops.sampler.dcgm"):
        out += _run(s, rig.start + 5.0)
    assert any("lost the DCGM host engine" in m for m in caplog.messages)
    lost = [x for x in out if x.error == "connection_lost"]
    assert lost and all(x.activity is None for x in lost)
    assert s.errors[("0", "connection_lost")] == len(lost)
    rig.engine.restart()
    with caplog.at_level(logging.WARNING, "gpuflops.sampler.dcgm"):
        out += _run(s, rig.start + 9.0)
    assert any("reconnected" in m for m in caplog.messages)
    after = [x for x in out if x.t0_s > rig.start + 7.0]
    assert after and all(x.activity is not None for x in after)
    assert [x.error for x in out].count("resync") == 1
    _contiguous(out)
    s.close()
    assert rig.engine.watches == {}


def test_profiler_held_by_another_tool_is_a_counted_gap(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.engine.watch_error = {1014: ds.DCGM_ST_IN_USE}
    with caplog.at_level(logging.WARNING, "gpuflops.sampler.dcgm"):
        s = _dcgm(rig)
        out = _run(s, rig.start + 2.0)
    assert any("another tool (Nsight, DCGM client) holds the profiler" in m for m in caplog.messages)
    assert out and all(x.activity is None and x.error == "profiler_in_use" for x in out)
    assert s.errors[("0", "profiler_in_use")] == len(out)
    rig.engine.watch_error = {}  # the other tool lets go; we retry the watch
    out += _run(s, rig.start + 5.0)
    back = [x for x in out if x.t0_s > rig.start + 3.5]
    assert back and all(x.activity is not None for x in back)
    assert [x.error for x in out].count("resync") == 1
    _contiguous(out)
    s.close()


def test_blank_values_are_gaps_never_zeros(rig: Rig) -> None:
    rig.engine.blank_windows = [(BF16[0] + 2.0, BF16[0] + 3.0)]
    s = _dcgm(rig)
    out = _busy(_run(s, BF16[1]), *BF16)
    s.close()
    blank = [x for x in out if x.error == "blank"]
    assert 9 <= len(blank) <= 11
    assert all(x.activity is None for x in blank)
    assert all(BF16[0] + 1.9 < x.t1_s < BF16[0] + 3.2 for x in blank)
    flops = [Integrator().integrate(s.gpus()[0], x) for x in blank]
    assert all(f.gap_reason == "blank" and f.total == 0 for f in flops)
    measured = [x for x in out if x.activity is not None]
    assert _mean(measured, Metric.HMMA) > 0.8


def test_mig_instances_are_units_with_their_own_activity() -> None:
    timeline, _ = fe.timeline_from_trace(TRACE)
    start = timeline.rows[0][0]
    clock = FakeClock(start)
    idle = fe.Timeline([(r[0], r[1], {m: 0.0 for m in (r[2] or {})}, r[3]) for r in timeline.rows])
    gpu = fe.FakeGpu(
        0,
        "NVIDIA H100 80GB HBM3",
        "GPU-fake-0",
        "hopper",
        timeline,
        instances=[fe.FakeInstance(7, 1, 3, timeline), fe.FakeInstance(8, 2, 3, idle)],
    )
    fe.install(fe.FakeHostEngine([gpu], clock))
    try:
        s = DcgmSampler(
            bindings_paths=[FAKE_DIR],
            clock=clock,
            sleep=clock.sleep,
            sm_count_for=lambda index, gi: {1: 60, 2: 60}.get(gi) if gi else 132,
        )
        units = s.gpus()
        assert [(u.key, u.gpu_instance_id, u.sm_count) for u in units] == [("0/gi1", 1, 60), ("0/gi2", 2, 60)]
        out = _run(s, BF16[1])
        s.close()
    finally:
        fe.install(None)
    busy = _busy(out, *BF16)
    gi1 = [x for x in busy if x.key == "0/gi1"]
    gi2 = [x for x in busy if x.key == "0/gi2"]
    assert _mean(gi1, Metric.HMMA) > 0.8
    assert gi2 and all(x.activity and x.activity[Metric.HMMA] == 0.0 for x in gi2)
    assert all(x.clock_hz and x.clock_hz > 1e9 for x in gi2)  # the parent GPU's clock


def test_mig_without_sm_counts_is_stated_not_guessed() -> None:
    timeline, _ = fe.timeline_from_trace(TRACE)
    clock = FakeClock(timeline.rows[0][0])
    gpu = fe.FakeGpu(
        0,
        "NVIDIA H100 80GB HBM3",
        "GPU-fake-0",
        "hopper",
        timeline,
        instances=[fe.FakeInstance(7, 1, 3, timeline)],
    )
    fe.install(fe.FakeHostEngine([gpu], clock))
    try:
        s = DcgmSampler(bindings_paths=[FAKE_DIR], clock=clock, sleep=clock.sleep)
        assert s.gpus()[0].sm_count is None
        x = s.sample()[0]
        s.close()
    finally:
        fe.install(None)
    assert Integrator().integrate(s.gpus()[0], x).gap_reason == "unknown_sm_count"


def test_coexists_with_another_client_on_the_same_engine(rig: Rig) -> None:
    # dcgm-exporter style: its own groups, the same profiling fields, a 1 s period.
    other = rig.engine.connect("exporter", False)
    gid = rig.engine.group_create(other, "exporter")
    rig.engine.group_add(other, gid, 1, 0)
    fid = rig.engine.field_group_create(other, [1002, 1004, 1014, 100], "exporter-fields")
    rig.engine.watch(other, gid, fid, 1_000_000)
    s = _dcgm(rig)
    out = _busy(_run(s, BF16[1]), *BF16)
    s.close()
    assert all(x.activity is not None for x in out) and _mean(out, Metric.HMMA) > 0.8
    assert list(rig.engine.watches) == [(other, gid, fid)]
    assert gid in rig.engine.groups and fid in rig.engine.field_groups


def test_endpoints_and_startup_failures(tmp_path: Path, rig: Rig) -> None:
    assert parse_endpoint("localhost:5555") == ("tcp", "localhost:5555")
    assert parse_endpoint("unix:///run/dcgm.sock") == ("unix", "/run/dcgm.sock")
    assert parse_endpoint("embedded") == ("embedded", None)
    s = _dcgm(rig, endpoint="unix:///run/nvidia-dcgm.sock")
    s.close()
    assert rig.engine.connections[-1] == ("/run/nvidia-dcgm.sock", True)
    s = _dcgm(rig, endpoint="embedded")
    s.close()
    assert rig.engine.connections[-1] == ("embedded", False)
    with pytest.raises(SamplerError, match="bindings not found"):
        _dcgm(rig, bindings_paths=[tmp_path])
    rig.engine.kill()
    with pytest.raises(SamplerError, match="cannot connect to DCGM at localhost:5555"):
        _dcgm(rig)
    rig.engine.restart()
    rig.engine.library_missing = True
    with pytest.raises(SamplerError, match="cannot load libdcgm"):
        _dcgm(rig)
