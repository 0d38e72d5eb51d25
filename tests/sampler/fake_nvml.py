"""A fake of the slice of pynvml that gpuflops uses, driven by a trace recorded on a real GPU.

It stands at the hardware boundary only: the real NvmlSampler code runs against it. GPM
metrics between two samples are the time-weighted mean of the recorded activity over the span
the two samples cover; the SM clock read at time t is the recorded interval mean at t; the
process list and per-process utilisation samples come from the trace too. Failures are
injected per function and GPU.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuflops.model import GpuInfo, GpuSample, Metric
from gpuflops.sampler.nvml import GPM_METRIC_IDS
from gpuflops.sampler.trace import load_trace

_ARCH_CODE = {"volta": 5, "turing": 6, "ampere": 7, "ada": 8, "hopper": 9, "blackwell": 10}
_ID_METRIC = {v: k for k, v in GPM_METRIC_IDS.items()}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"fake NVML error {value}")
        self.value = value


@dataclass
class Timeline:
    """Recorded samples of one unit, shifted so the trace starts at ``origin``."""

    samples: list[GpuSample]
    shift: float = 0.0

    def __post_init__(self) -> None:
        self._ends = [s.t1_s for s in self.samples]

    def at(self, t: float) -> GpuSample | None:
        t -= self.shift
        i = bisect.bisect_left(self._ends, t)
        return self.samples[i] if i < len(self.samples) else None

    def mean_activity(self, a: float, b: float) -> dict[Metric, float] | None:
        a, b = a - self.shift, b - self.shift
        acc: dict[Metric, float] = {}
        total = 0.0
        i = max(0, bisect.bisect_left(self._ends, a))
        while i < len(self.samples) and self.samples[i].t0_s < b:
            s = self.samples[i]
            w = min(b, s.t1_s) - max(a, s.t0_s)
            if w > 0 and s.activity is not None:
                for m, v in s.activity.items():
                    acc[m] = acc.get(m, 0.0) + v * w
                total += w
            i += 1
        if total <= 0:
            return None
        return {m: v / total for m, v in acc.items()}


@dataclass
class FakeGpu:
    info: GpuInfo
    timeline: Timeline
    gpm_supported: bool = True
    cores: int | None = None
    attributes_supported: bool = False  # pass-through VMs answer NotSupported (gpu-facts)
    fail: dict[str, int] = field(default_factory=dict)  # function name -> error code
    # MIG mode: one (gpu instance id, SM count) per MIG device; empty = MIG disabled. Every
    # instance replays this GPU's recorded timeline (enough for enumeration and routing tests).
    mig: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class MigHandle:
    gpu: int
    index: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int


@dataclass
class _Util:
    pid: int
    timeStamp: int
    smUtil: int


class _Support:
    def __init__(self, ok: bool) -> None:
        self.isSupportedDevice = 1 if ok else 0


class _Metric:
    def __init__(self) -> None:
        self.metricId = 0
        self.nvmlReturn = 0
        self.value = 0.0


class _MetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [_Metric() for _ in range(210)]


class _Sample:
    def __init__(self) -> None:
        self.t: float | None = None
        self.gpu: int | None = None


class _Util3:
    def __init__(self, gpu: int) -> None:
        self.gpu = gpu
        self.memory = 0


class FakeNvml:
    """Module-like object exposing the pynvml names NvmlSampler calls."""

    NVML_SUCCESS = 0
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    NVML_CLOCK_SM = 1
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_GPM_METRICS_GET_VERSION = 1
    NVMLError = NVMLError
    c_nvmlGpmMetricsGet_t = _MetricsGet

    def __init__(self, gpus: list[FakeGpu], clock: Any, *, init_error: int | None = None) -> None:
        self.gpus = gpus
        self.clock = clock
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.freed = 0

    def _hit(self, name: str, handle: int | MigHandle | None = None) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if handle is not None:
            code = self._gpu(handle).fail.get(name)
            if code is not None:
                raise NVMLError(code)

    def _gpu(self, h: int | MigHandle) -> FakeGpu:
        return self.gpus[h.gpu if isinstance(h, MigHandle) else h]

    # -- system
    def nvmlInit(self) -> None:
        self._hit("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._hit("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return "fake"

    def nvmlSystemGetNVMLVersion(self) -> str:
        return "fake"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    # -- device facts
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._hit("nvmlDeviceGetHandleByIndex", i)
        return i

    def nvmlDeviceGetUUID(self, h: int | MigHandle) -> str:
        if isinstance(h, MigHandle):
            return f"MIG-{self.gpus[h.gpu].info.uuid}-{h.index}"
        return self.gpus[h].info.uuid

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h].info.name

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        self._hit("nvmlDeviceGetPciInfo", h)
        return type("PciInfo", (), {"busId": f"00000000:{0x18 + h:02X}:00.0".encode()})()

    def nvmlDeviceGetArchitecture(self, h: int) -> int:
        return _ARCH_CODE.get(self.gpus[h].info.architecture, 0xFFFFFFFF)

    def nvmlDeviceGetMigMode(self, h: int) -> tuple[int, int]:
        self._hit("nvmlDeviceGetMigMode", h)
        if self.gpus[h].mig:
            return (self.NVML_DEVICE_MIG_ENABLE, self.NVML_DEVICE_MIG_ENABLE)
        raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: int) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int, i: int) -> MigHandle:
        self._hit("nvmlDeviceGetMigDeviceHandleByIndex", h)
        if i >= len(self.gpus[h].mig):
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return MigHandle(h, i)

    def nvmlDeviceGetGpuInstanceId(self, mh: MigHandle) -> int:
        return self.gpus[mh.gpu].mig[mh.index][0]

    def nvmlDeviceGetAttributes(self, h: int | MigHandle) -> Any:
        g = self._gpu(h)
        sm: int | None
        if isinstance(h, MigHandle):
            sm = g.mig[h.index][1]
        elif not g.attributes_supported:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        else:
            sm = g.info.sm_count

        class _A:
            multiprocessorCount = sm

        return _A()

    def nvmlDeviceGetNumGpuCores(self, h: int) -> int:
        g = self.gpus[h]
        if g.cores is not None:
            return g.cores
        return (g.info.sm_count or 0) * 128

    def nvmlGpmQueryDeviceSupport(self, h: int) -> _Support:
        self._hit("nvmlGpmQueryDeviceSupport", h)
        return _Support(self.gpus[h].gpm_supported)

    # -- GPM
    def nvmlGpmSampleAlloc(self) -> _Sample:
        return _Sample()

    def nvmlGpmSampleFree(self, s: _Sample) -> None:
        self.freed += 1

    def nvmlGpmSampleGet(self, h: int, s: _Sample) -> _Sample:
        self._hit("nvmlGpmSampleGet", h)
        s.t, s.gpu = self.clock(), h
        return s

    def nvmlGpmMigSampleGet(self, h: int, gpu_instance_id: int, s: _Sample) -> _Sample:
        self._hit("nvmlGpmMigSampleGet", h)
        if gpu_instance_id not in [gi for gi, _sm in self.gpus[h].mig]:
            raise NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        s.t, s.gpu = self.clock(), h
        return s

    def nvmlGpmMetricsGet(self, mg: _MetricsGet) -> _MetricsGet:
        h = mg.sample1.gpu
        self._hit("nvmlGpmMetricsGet", h)
        act = self.gpus[h].timeline.mean_activity(mg.sample1.t, mg.sample2.t)
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            metric = _ID_METRIC.get(m.metricId)
            if act is None or metric not in act:
                m.nvmlReturn = self.NVML_ERROR_NOT_SUPPORTED
                continue
            m.nvmlReturn = self.NVML_SUCCESS
            m.value = act[metric] * 100.0
        return mg

    # -- clocks, processes
    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        self._hit("nvmlDeviceGetClockInfo", h)
        s = self.gpus[h].timeline.at(self.clock())
        if s is None or s.clock_hz is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return round(s.clock_hz / 1e6)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int | MigHandle) -> list[_Proc]:
        self._hit("nvmlDeviceGetComputeRunningProcesses", h)
        s = self._gpu(h).timeline.at(self.clock())
        return [_Proc(p.pid, p.used_memory_bytes or 0) for p in (s.processes if s else ())]

    def nvmlDeviceGetProcessUtilization(self, h: int | MigHandle, last_ts: int) -> list[_Util]:
        self._hit("nvmlDeviceGetProcessUtilization", h)
        tl = self._gpu(h).timeline
        now = self.clock()
        out = []
        for s in tl.samples:
            for u in s.process_util:
                ts = u.timestamp_s + tl.shift
                if last_ts / 1e6 < ts <= now:
                    out.append(_Util(u.pid, int(ts * 1e6), round(u.sm_util * 100)))
        if not out:
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return out

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Util3:
        s = self.gpus[h].timeline.at(self.clock())
        return _Util3(round((s.gpu_util or 0) * 100) if s else 0)


def from_trace(path: Path, clock: Any, start: float) -> tuple[FakeNvml, list[FakeGpu]]:
    """Fake GPUs that replay the trace's recorded activity from wall time ``start`` on."""
    header, intervals, _ = load_trace(path)
    gpus = []
    first = intervals[0].t0_s
    for info in header.gpus:
        samples = [s for iv in intervals for s in iv.samples if s.key == info.key]
        gpus.append(FakeGpu(info, Timeline(samples, shift=start - first)))
    return FakeNvml(gpus, clock), gpus
