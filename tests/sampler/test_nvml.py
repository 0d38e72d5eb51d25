"""NvmlSampler against FakeNvml, which replays a trace recorded on an H100 (hardware boundary only)."""

from __future__ import annotations

import itertools
import threading
from dataclasses import replace
from pathlib import Path

import fake_nvml
import pytest

from gpuflops.model import GpuSample, Metric
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.base import Sampler, SamplerError
from gpuflops.sampler.nvml import GPM_METRIC_IDS, NvmlSampler
from tests.support import DEMO_TRACE, FakeClock, demo_trace

DEMO = DEMO_TRACE
_HEADER, _INTERVALS, _EVENTS = demo_trace()
T0 = _INTERVALS[0].t0_s
PHASES = {e.data["name"]: e.data for e in _EVENTS if e.data["kind"] == "phase" and not e.data.get("shared")}
SHARED = [e.data for e in _EVENTS if e.data.get("shared")]
# Both processes of the shared phase hold a CUDA context from here on (before their GEMMs start).
TWO_PROCS_T = next(s.t0_s for iv in _INTERVALS for s in iv.samples if len(s.processes) > 1)


def _node(n_gpus: int = 1) -> tuple[FakeClock, fake_nvml.FakeNvml, list[fake_nvml.FakeGpu]]:
    """Fake GPUs replaying the demo trace from its own start time; extra GPUs share the timeline."""
    clock = FakeClock(T0)
    fake, gpus = fake_nvml.from_trace(DEMO, clock, clock.t)
    for i in range(1, n_gpus):
        info = replace(gpus[0].info, key=str(i), index=i, uuid=f"GPU-second-{i}")
        gpus.append(fake_nvml.FakeGpu(info, gpus[0].timeline))
    return clock, fake, gpus


def _sampler(clock: FakeClock, fake: fake_nvml.FakeNvml, **kw: object) -> NvmlSampler:
    return NvmlSampler(nvml=fake, clock=clock, sleep=clock.sleep, stop=threading.Event(), **kw)  # type: ignore[arg-type]


def _run_until(s: NvmlSampler, clock: FakeClock, t_end: float) -> list[list[GpuSample]]:
    out = []
    while clock.t < t_end:
        out.append(s.sample())
    return out


def test_enumerates_units_and_derives_sm_count_from_cores() -> None:
    clock, fake, gpus = _node(2)
    gpus[1].attributes_supported = True  # GPU 1 answers nvmlDeviceGetAttributes
    gpus[1].cores = 1000  # ignored: the attribute wins
    s = _sampler(clock, fake)
    assert isinstance(s, Sampler)
    infos = s.gpus()
    assert [g.key for g in infos] == ["0", "1"]
    assert [g.sm_count for g in infos] == [132, 132]
    g0 = infos[0]
    assert g0.uuid == _HEADER.gpus[0].uuid and g0.name == "NVIDIA H100 80GB HBM3"
    assert g0.architecture == "hopper" and g0.metrics == frozenset(GPM_METRIC_IDS)
    assert g0.unavailable_reason is None and g0.gpu_instance_id is None
    s.close()


def test_sm_count_unknown_when_cores_do_not_divide() -> None:
    clock, fake, gpus = _node()
    gpus[0].cores = 132 * 128 + 7
    s = _sampler(clock, fake)
    assert s.gpus()[0].sm_count is None
    s.close()


def test_devices_filter_and_enumeration_failure_of_one_gpu() -> None:
    clock, fake, _ = _node(3)
    s = _sampler(clock, fake, devices=[2])
    assert [g.key for g in s.gpus()] == ["2"]
    s.close()
    clock, fake, gpus = _node(2)
    gpus[0].fail["nvmlDeviceGetHandleByIndex"] = fake.NVML_ERROR_UNKNOWN
    s = _sampler(clock, fake)
    assert [g.key for g in s.gpus()] == ["1"]
    s.close()
    clock, fake, gpus = _node(1)
    gpus[0].fail["nvmlDeviceGetHandleByIndex"] = fake.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(SamplerError, match="no GPUs"):
        _sampler(clock, fake)


def test_samples_reproduce_recorded_flops_within_one_percent(tmp_path: Path) -> None:
    (tmp_path / "458").mkdir()
    (tmp_path / "458" / "comm").write_text("python3\n")
    clock, fake, _ = _node()
    s = _sampler(clock, fake, interval_s=0.1, clock_period_s=0.02, proc_root=tmp_path)
    info = s.gpus()[0]
    integ = Integrator()
    ph = PHASES["bf16"]
    lo, hi = ph["t0"] - 1, ph["t1"] + 1
    got = [x[0] for x in _run_until(s, clock, hi + 0.5)]
    window = [x for x in got if x.t1_s > lo and x.t0_s < hi]
    assert all(x.activity is not None for x in window)
    assert all(x.clock_reads == 5 for x in window[1:])
    measured = sum(integ.integrate(info, x).total for x in window)
    recorded = sum(
        integ.integrate(info, x).total
        for iv in _INTERVALS
        for x in iv.samples
        if x.t1_s > lo and x.t0_s < hi
    )
    assert measured == pytest.approx(recorded, rel=0.01)
    assert measured == pytest.approx(ph["flops"], rel=0.025)
    busy = window[len(window) // 2]
    assert busy.activity is not None and busy.activity[Metric.HMMA] > 0.8
    assert busy.processes and busy.processes[0].pid == 458 and busy.processes[0].comm == "python3"
    # Intervals tile time: each starts where the previous ended.
    for a, b in itertools.pairwise(got):
        assert b.t0_s == pytest.approx(a.t1_s)
        assert b.duration_s == pytest.approx(0.1, abs=1e-6)
    s.close()


Run = list[list[GpuSample]]


def _fault_run(code_name: str, fail_for: int) -> tuple[Run, Run, NvmlSampler]:
    """Baseline and faulty runs on two GPUs; GPU 1's GPM sampling fails ``fail_for`` times."""
    start = PHASES["bf16"]["t0"] + 1
    clock, fake, _ = _node(2)
    base = _sampler(clock, fake)
    _run_until(base, clock, start)
    baseline = [base.sample() for _ in range(200)]
    base.close()

    clock, fake, gpus = _node(2)
    s = _sampler(clock, fake)
    _run_until(s, clock, start)
    gpus[1].fail["nvmlGpmSampleGet"] = getattr(fake, code_name)
    out = [s.sample() for _ in range(fail_for)]
    del gpus[1].fail["nvmlGpmSampleGet"]
    out += [s.sample() for _ in range(200 - fail_for)]
    return baseline, out, s


@pytest.mark.parametrize(
    ("code_name", "kind"),
    [("NVML_ERROR_TIMEOUT", "timeout"), ("NVML_ERROR_NOT_SUPPORTED", "not_supported")],
)
def test_gpm_failure_on_one_gpu_gaps_resyncs_and_recovers(code_name: str, kind: str) -> None:
    baseline, out, s = _fault_run(code_name, fail_for=3)
    # GPU 0 is untouched: identical to a run without the fault.
    assert [x[0] for x in out] == [x[0] for x in baseline]
    g1 = [x[1] for x in out]
    assert [x.error for x in g1[:4]] == [kind, kind, kind, "resync"]
    assert all(x.activity is None for x in g1[:4])
    assert all(x.clock_hz is not None for x in g1[:4])  # the clock is still read
    assert all(x.activity is not None and x.error is None for x in g1[4:])
    assert g1[10].activity is not None and g1[10].activity[Metric.HMMA] > 0.8
    assert s.errors == {("1", kind): 3}
    s.close()


def test_lost_gpu_backs_off_then_recovers() -> None:
    _baseline, out, s = _fault_run("NVML_ERROR_GPU_IS_LOST", fail_for=1)
    assert all(x[0].activity is not None for x in out)
    g1 = [x[1] for x in out]
    assert g1[0].error == "gpu_lost"
    lost = [i for i, x in enumerate(g1) if x.error == "gpu_lost"]
    # Not retried for 10 s (100 intervals of 0.1 s): gaps, no further NVML errors counted.
    assert lost == list(range(len(lost))) and 99 <= len(lost) <= 101
    assert all(x.clock_hz is None for x in g1[1 : len(lost)])  # a lost GPU's clock is not read
    after = g1[len(lost)]
    assert after.error == "resync" and after.activity is None
    assert all(x.activity is not None for x in g1[len(lost) + 1 :])
    assert s.errors == {("1", "gpu_lost"): 1}
    s.close()


def test_gpu_without_gpm_reports_no_activity_but_reads_the_clock() -> None:
    clock, fake, gpus = _node(2)
    gpus[0].gpm_supported = False
    gpus[1].fail["nvmlGpmQueryDeviceSupport"] = fake.NVML_ERROR_NOT_SUPPORTED
    s = _sampler(clock, fake)
    g0, g1 = s.gpus()
    assert g0.metrics == frozenset() and g1.metrics == frozenset()
    assert g0.unavailable_reason is not None and "GPM not supported" in g0.unavailable_reason
    assert g1.unavailable_reason is not None and "GPM not available (not_supported)" in g1.unavailable_reason
    samples = _run_until(s, clock, PHASES["bf16"]["t0"] + 2)
    last = samples[-1]
    for x in last:
        assert x.activity is None and x.error == "tensor_activity_unavailable"
        assert x.clock_hz is not None and x.clock_hz > 1e9 and x.clock_reads == 5
    assert "nvmlGpmSampleGet" not in fake.calls
    assert Integrator().integrate(g0, last[0]).gap_reason == "tensor_activity_unavailable"
    s.close()


def test_init_failure_and_too_short_interval() -> None:
    clock, fake, _ = _node()
    fake.init_error = fake.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(SamplerError, match=r"cannot initialise NVML \(driver_not_loaded"):
        _sampler(clock, fake)
    clock, fake, _ = _node()
    with pytest.raises(SamplerError, match=r">= 0.1s"):
        _sampler(clock, fake, interval_s=0.05)
    assert "nvmlInit" not in fake.calls  # refused before touching the driver


def test_process_utilisation_fetched_only_when_processes_share_the_gpu() -> None:
    clock, fake, _ = _node()
    s = _sampler(clock, fake, process_period_s=1.0)
    alone = _run_until(s, clock, TWO_PROCS_T - 0.2)
    assert fake.calls.get("nvmlDeviceGetProcessUtilization", 0) == 0
    # The process list is refreshed once per process_period_s (1 s).
    seconds = clock.t - T0
    assert abs(fake.calls["nvmlDeviceGetComputeRunningProcesses"] - seconds) <= 2
    assert all(not x[0].process_util for x in alone)
    shared = _run_until(s, clock, SHARED[0]["t1"])
    assert fake.calls.get("nvmlDeviceGetProcessUtilization", 0) > 0
    utils = [u for x in shared for u in x[0].process_util]
    assert {u.pid for u in utils} >= {1470, 1471}
    # The first call asks for everything the driver kept: older samples of an exited process
    # may come along, but only from before the sharing began.
    assert all(u.timestamp_s < TWO_PROCS_T for u in utils if u.pid not in (1470, 1471))
    both = [x[0] for x in shared if len(x[0].processes) == 2]
    assert len(both) > 30
    assert all(0 <= u.sm_util <= 1 for x in shared for u in x[0].process_util)
    s.close()


def test_stop_and_close() -> None:
    clock, fake, _ = _node(2)
    stop = threading.Event()
    s = NvmlSampler(nvml=fake, clock=clock, sleep=clock.sleep, stop=stop)  # type: ignore[arg-type]
    s.sample()
    stop.set()
    with pytest.raises(StopIteration):
        s.sample()
    s.close()
    s.close()
    assert fake.freed == 4  # two GPM sample buffers per unit
    assert fake.calls["nvmlShutdown"] == 1
    with pytest.raises(StopIteration):
        s.sample()


def test_mig_instances_are_separate_units() -> None:
    clock, fake, gpus = _node(2)
    gpus[0].mig = [(1, 16), (2, 60)]
    s = _sampler(clock, fake)
    infos = s.gpus()
    assert [g.key for g in infos] == ["0/gi1", "0/gi2", "1"]
    assert [g.sm_count for g in infos] == [16, 60, 132]
    assert [g.gpu_instance_id for g in infos] == [1, 2, None]
    assert infos[0].uuid.startswith("MIG-") and infos[0].index == 0
    out = _run_until(s, clock, PHASES["bf16"]["t0"] + 2)
    last = out[-1]
    assert [x.key for x in last] == ["0/gi1", "0/gi2", "1"]
    assert all(x.activity is not None and x.clock_hz is not None for x in last)
    assert fake.calls["nvmlGpmMigSampleGet"] > 0
    # GPU 0 is sampled only per instance; GPU 1 (no MIG) only as a whole.
    assert fake.calls["nvmlGpmSampleGet"] == len(out) + 1
    s.close()
