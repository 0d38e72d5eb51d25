"""PM sampling source, driven by the samples CUPTI recorded on an H200 in run 21.

The fake sits at the CUPTI boundary (a PmDevice that hands back the recorded samples as they
would have completed); everything above it is the real PmSampling and ProfilerWatch.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from gpuflops.sampler.pm import MIN_COVERAGE, PmError, PmSampling, ProfilerWatch

DATA = Path(__file__).resolve().parents[1] / "data" / "h200-pm-samples.json.gz"
LAG_NS = 3_000_000  # run 21: the newest sample was ~3 ms old at the quickest decode


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(gzip.decompress(DATA.read_bytes()))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Replayed:
    """A PmDevice whose samples complete on the recorded timeline of the fake clock."""

    pid = None

    def __init__(self, samples: list[list[float]], clock: Clock) -> None:
        self._samples = samples
        self._clock = clock
        self._next = 0
        self.closed = False

    def read(self) -> list[tuple[int, int, float, float]]:
        now_ns = self._clock() * 1e9 - LAG_NS
        out = []
        while self._next < len(self._samples) and self._samples[self._next][1] <= now_ns:
            s0, s1, cyc, tensor = self._samples[self._next]
            out.append((int(s0), int(s1), cyc, tensor))
            self._next += 1
        return out

    def close(self) -> None:
        self.closed = True


def _windows(recorded: dict, interval_s: float = 0.5):
    samples = recorded["samples"]
    clock = Clock(samples[0][0] / 1e9)
    dev = Replayed(samples, clock)
    pm = PmSampling({"0": "0000:00:00.0"}, lambda bus, period: dev, clock=clock)
    pm.start()
    t = samples[0][0] / 1e9 + 0.6  # the first sample is the long one from start to first trigger
    out = []
    while t < samples[-1][1] / 1e9:
        clock.t = t
        out.append((t - interval_s, t, pm.window("0", t - interval_s, t)))
        t += interval_s
    return out, pm


def test_windows_count_every_recorded_tensor_cycle_once(recorded: dict) -> None:
    wins, _pm = _windows(recorded)
    got = sum(w.tensor_cycles for _a, _b, w in wins if w is not None)
    assert all(w is not None for _a, _b, w in wins[1:]), "a full window fell back"
    first_end = wins[0][1]
    want = sum(s[3] for s in recorded["samples"] if s[0] / 1e9 >= first_end - 0.5 - 0.02)
    assert got == pytest.approx(want, rel=2e-3)


@pytest.mark.parametrize(("phase", "ops_per_cycle", "low", "high"), [
    ("bf16", 1024, 0.97, 1.03),  # cuBLAS nvjet_sm90 wgmma
    ("bf16_vocab_aligned", 1024, 0.97, 1.03),
    ("sdpa", 1024, 0.95, 1.03),  # cuDNN flash wgmma; the phase's first call warms up
    ("fp8", 2048, 0.95, 1.03),
    ("tf32", 512, 0.95, 1.03),
    ("bf16_vocab", 512, 0.95, 1.03),  # cutlass_75 s1688 (mma.sync): half the ops per cycle
])
def test_tensor_cycles_times_path_rate_is_the_exact_count(recorded: dict, phase: str,
                                                          ops_per_cycle: int, low: float,
                                                          high: float) -> None:
    wins, _pm = _windows(recorded)
    ph = next(p for p in recorded["phases"] if p["name"] == phase)
    # Phases are padded by a second of idle, so whole windows touching the phase hold all of it.
    cycles = sum(w.tensor_cycles for a, b, w in wins if w is not None and b > ph["t0"]
                 and a < ph["t1"])
    assert low < cycles * ops_per_cycle / ph["flops"] < high


def test_real_clock_runs_below_nvml_under_the_power_cap(recorded: dict) -> None:
    wins, _pm = _windows(recorded)
    ph = next(p for p in recorded["phases"] if p["name"] == "bf16")
    inside = [w for a, b, w in wins if w is not None and a >= ph["t0"] and b <= ph["t1"]]
    pm_hz = sum(w.sm_cycles for w in inside) / sum(w.covered_s for w in inside)
    nvml = [hz for t, hz in recorded["nvml_clock"] if ph["t0"] <= t <= ph["t1"]]
    nvml_hz = sum(nvml) / len(nvml)
    assert 1.25e9 < pm_hz < 1.45e9
    assert nvml_hz / pm_hz > 1.08  # NVML ahead of the SMs' real clock, as on every H200 run


def test_a_device_that_cannot_open_falls_back_and_is_retried() -> None:
    clock = Clock(1000.0)
    calls: list[str] = []

    def opener(bus: str, period: float) -> Replayed:
        calls.append(bus)
        raise PmError("counters_unavailable", "held by another profiler")

    pm = PmSampling({"0": "bus0"}, opener, clock=clock, retry_s=30)
    pm.start()
    assert pm.window("0", 999.5, 1000.0) is None
    assert pm.status() == {"0": "counters_unavailable"}
    assert pm.errors[("0", "pm_counters_unavailable")] == 1
    clock.t = 1010.0
    assert pm.window("0", 1009.5, 1010.0) is None
    assert len(calls) == 1, "retried before retry_s"
    clock.t = 1031.0
    pm.window("0", 1030.5, 1031.0)
    assert len(calls) == 2


def test_a_read_error_drops_the_session_and_counts_it(recorded: dict) -> None:
    clock = Clock(recorded["samples"][0][0] / 1e9 + 1.0)

    class Broken(Replayed):
        def read(self) -> list[tuple[int, int, float, float]]:
            raise PmError("decode", "CUPTI_ERROR_UNKNOWN")

    dev = Broken(recorded["samples"], clock)
    pm = PmSampling({"0": "bus0"}, lambda b, p: dev, clock=clock)
    pm.start()
    assert pm.window("0", clock.t - 0.5, clock.t) is None
    assert dev.closed
    assert pm.status()["0"] == "decode"
    assert pm.errors[("0", "pm_decode")] == 1


def test_partial_coverage_is_not_extrapolated(recorded: dict) -> None:
    samples = recorded["samples"]
    clock = Clock(samples[0][0] / 1e9)
    dev = Replayed(samples, clock)
    pm = PmSampling({"0": "bus0"}, lambda b, p: dev, clock=clock)
    pm.start()
    t = samples[40][1] / 1e9 + 0.01
    clock.t = t
    # An interval that began long before sampling did: samples cover far less than it.
    assert pm.window("0", t - 10.0, t) is None
    assert pm.errors[("0", "pm_partial_window")] == 1
    assert MIN_COVERAGE >= 0.9


def test_holding_for_a_profiler_releases_the_counters(recorded: dict) -> None:
    clock = Clock(recorded["samples"][0][0] / 1e9 + 2.0)
    opened: list[Replayed] = []

    def opener(bus: str, period: float) -> Replayed:
        opened.append(Replayed(recorded["samples"], clock))
        return opened[-1]

    pm = PmSampling({"0": "bus0"}, opener, clock=clock)
    pm.start()
    pm.hold("0", "pid 42 (python3, ncu)")
    assert opened[0].closed
    assert pm.window("0", clock.t - 0.5, clock.t) is None
    assert pm.status()["0"] == "held_by_pid 42 (python3, ncu)"
    assert len(opened) == 1, "reopened while held"
    pm.release("0")
    clock.t += 0.5
    pm.window("0", clock.t - 0.5, clock.t)
    assert len(opened) == 2 and pm.status()["0"] is None


def _proc(tmp: Path, pid: int, comm: str, env: dict[str, str]) -> None:
    d = tmp / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))


def test_profiler_watch_finds_ncu_targets_from_their_environment(tmp_path: Path) -> None:
    # The variables ncu 2025.3 set in its target's environment (run 21), and an ordinary job.
    _proc(tmp_path, 100, "python3", {"PATH": "/usr/bin", "NV_CUDA_LIB_VERSION": "13.0.2-1"})
    _proc(tmp_path, 200, "python3", {"NV_NSIGHT_INJECTION_TRANSPORT_TYPE": "uds",
                                     "NV_COMPUTE_PROFILER_PERFWORKS_DIR": "/opt/nvidia/x"})
    _proc(tmp_path, 300, "train", {"XCUDA_INJECTION64_PATH": "not-a-marker"})
    watch = ProfilerWatch(tmp_path, own_pid=1)
    found = watch.scan()
    assert list(found) == [200]
    assert "python3" in found[200]
    for name in os.listdir(tmp_path / "200"):
        (tmp_path / "200" / name).unlink()
    (tmp_path / "200").rmdir()
    assert watch.scan() == {}


# ---------------------------------------------------------------- PmCountedSampler


class _Inner:
    """A sampler ending intervals on the recorded timeline (the fake clock); GPU 1 is MIG."""

    name = "nvml"
    interval_s = 0.5
    def __init__(self, clock: Clock, start: float) -> None:
        from gpuflops.model import GpuInfo, Metric

        self.errors: dict[tuple[str, str], int] = {}
        self._clock, self._t = clock, start
        self._act = {Metric.HMMA: 0.5}
        self._infos = [GpuInfo("0", 0, "GPU-a", "NVIDIA H200", "hopper", 132),
                       GpuInfo("1/gi1", 1, "MIG-b", "NVIDIA H200", "hopper", 16,
                               gpu_instance_id=1)]
        self.closed = False

    def gpus(self):  # type: ignore[no-untyped-def]
        return self._infos

    def sample(self):  # type: ignore[no-untyped-def]
        from gpuflops.model import GpuSample

        t0, self._t = self._t, self._t + 0.5
        self._clock.t = self._t
        return [GpuSample(g.key, t0, self._t, self._act, 1.98e9, 5) for g in self._infos]

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        self.closed = True


def test_counted_sampler_adds_pm_cycles_to_whole_gpus_only(recorded: dict,
                                                           tmp_path: Path) -> None:
    from gpuflops.sampler.pm import PmCountedSampler

    samples = recorded["samples"]
    clock = Clock(samples[0][0] / 1e9 + 0.6)
    inner = _Inner(clock, clock.t)
    dev = Replayed(samples, clock)
    pm = PmSampling({"0": "bus0"}, lambda b, p: dev, clock=clock)
    pm.start()
    (tmp_path / "proc").mkdir()
    watch = ProfilerWatch(tmp_path / "proc", own_pid=1)
    s = PmCountedSampler(inner, pm, watch=watch, watch_period_s=0.0, clock=clock)
    first = s.sample()
    assert first[0].counter_source == "cupti_pm" and first[0].tensor_cycles is not None
    assert first[0].real_clock_hz is not None and 1.0e9 < first[0].real_clock_hz < 2.0e9
    assert first[1].counter_source == "nvml" and first[1].sm_cycles is None  # MIG: device-wide
    # A profiler target appears: every whole GPU falls back to NVML's clock, sampling goes on.
    _proc(tmp_path / "proc", 77, "python3", {"NV_NSIGHT_INJECTION_TRANSPORT_TYPE": "uds"})
    held = s.sample()
    assert [x.counter_source for x in held] == ["nvml", "nvml"]
    assert all(x.activity is not None for x in held)
    assert s.status()["0"].startswith("held_by_pid 77")
    assert dev.closed
    for name in os.listdir(tmp_path / "proc" / "77"):
        (tmp_path / "proc" / "77" / name).unlink()
    (tmp_path / "proc" / "77").rmdir()
    back = s.sample()  # released: the session reopens for this very window
    assert back[0].counter_source == "cupti_pm"
    assert s.sample()[0].tensor_cycles is not None
    s.close()
    assert inner.closed


def test_daemon_falls_back_to_nvml_clock_without_cupti(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import sys
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fake_nvml

    from gpuflops.app.assemble import build_sampler
    from gpuflops.config import Settings
    from gpuflops.sampler.base import SamplerError
    from gpuflops.sampler.nvml import NvmlSampler
    from tests.support import DEMO_TRACE, FakeClock, demo_trace

    _h, intervals, _e = demo_trace()
    clock = FakeClock(intervals[0].t0_s)
    fake, _gpus = fake_nvml.from_trace(DEMO_TRACE, clock, clock.t)

    def nvml(**kw: object) -> NvmlSampler:
        return NvmlSampler(nvml=fake, clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("gpuflops.sampler.nvml.NvmlSampler", nvml)
    # This machine has no cupti-python: the opener refuses, and auto falls back with a warning.
    chosen, stop = build_sampler(Settings(backend="nvml"))
    assert isinstance(chosen, NvmlSampler) and isinstance(stop, threading.Event)
    assert "CUPTI PM sampling unavailable" in caplog.text
    assert chosen.pci_bus_ids() == {"0": "00000000:18:00.0"}
    chosen.close()
    with pytest.raises(SamplerError, match="--counters cupti"):
        build_sampler(Settings(backend="nvml", counters="cupti"))


# ---------------------------------------------------------------- worker processes


def _opener(mode: str, **kw: float):  # type: ignore[no-untyped-def]
    import sys

    from gpuflops.sampler.pm_worker import WorkerOpener

    script = Path(__file__).with_name("pm_fake_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return WorkerOpener([sys.executable, str(script), mode], env=env, **kw)


@pytest.mark.timeout(60)
def test_a_worker_process_streams_its_samples_and_is_ended_on_close() -> None:
    import time

    session = _opener("replay")("00000000:18:00.0", 0.01)
    assert session.pid is not None
    time.sleep(1.0)
    got = session.read()
    assert len(got) > 50  # 10 ms samples for about a second
    assert all(s1 > s0 for s0, s1, _c, _t in got)
    session.close()
    with pytest.raises(ProcessLookupError):
        os.kill(session.pid, 0)


@pytest.mark.timeout(60)
def test_pm_windows_from_a_worker_process_count_the_recorded_cycles() -> None:
    import time

    pm = PmSampling({"0": "00000000:18:00.0"}, _opener("replay"), period_s=0.01)
    pm.start()
    assert len(pm.worker_pids()) == 1
    t0 = time.time()
    time.sleep(0.6)
    w = pm.window("0", t0, time.time())
    assert w is not None and w.covered_s > 0.5 and w.sm_cycles > 0
    pm.close()
    assert pm.worker_pids() == set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("mode", "kind"), [("refuse", "counters_unavailable"),
                                            ("hang", "worker_start_timeout")])
def test_a_worker_that_cannot_sample_is_a_clear_error(mode: str, kind: str) -> None:
    with pytest.raises(PmError) as e:
        _opener(mode, start_timeout_s=2.0)("bus", 0.01)
    assert e.value.kind == kind


@pytest.mark.timeout(60)
def test_a_worker_that_dies_falls_back_and_one_that_will_not_stop_is_killed() -> None:
    import time

    crash = _opener("crash")("bus", 0.01)
    time.sleep(1.5)
    with pytest.raises(PmError) as e:
        while True:  # what it sent before dying comes first
            crash.read()
            time.sleep(0.05)
    assert e.value.kind == "worker_exited" and "(3)" in str(e.value)
    crash.close()
    deaf = _opener("deaf")("bus", 0.01)
    t = time.monotonic()
    deaf.close()  # ignores SIGTERM: killed after the grace period, never waited on for long
    assert time.monotonic() - t < 6
    assert deaf.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(deaf.pid, 0)


def test_a_lagging_worker_still_counts_every_cycle_once(recorded: dict) -> None:
    # A worker decodes every 0.1 s and the pipe adds latency: the newest sample can be ~0.15 s
    # behind the interval's end. Windows then trail the intervals; none falls back, none loses
    # or repeats a sample.
    global LAG_NS
    saved, LAG_NS = LAG_NS, 150_000_000
    try:
        wins, pm = _windows(recorded)
    finally:
        LAG_NS = saved
    assert all(w is not None for _a, _b, w in wins[1:])
    got = sum(w.tensor_cycles for _a, _b, w in wins if w is not None)
    first_end = wins[0][1]
    want = sum(s[3] for s in recorded["samples"] if s[0] / 1e9 >= first_end - 0.5 - 0.02
               and s[1] / 1e9 <= wins[-1][1] - 0.15)
    assert got == pytest.approx(want, rel=5e-3)
    assert ("0", "pm_partial_window") not in pm.errors


@pytest.mark.timeout(60)
def test_a_read_asks_the_worker_to_decode_and_gets_the_samples_up_to_now() -> None:
    import time

    # The fake worker's own idle decode comes after 1 s: samples within 0.3 s can only be the
    # answer to the read's request.
    session = _opener("replay")("00000000:18:00.0", 0.01)
    try:
        time.sleep(0.3)
        t = time.time()
        got = session.read()
        assert len(got) >= 20
        assert got[-1][1] / 1e9 > t - 0.1  # up to the request, not an old batch
        again = session.read()
        assert all(s0 >= got[-1][1] for s0, _s1, _c, _t in again)  # nothing twice
    finally:
        session.close()
