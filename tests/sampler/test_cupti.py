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

from gpuflops.sampler.cupti import MIN_COVERAGE, PmError, PmSampling, ProfilerWatch

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
