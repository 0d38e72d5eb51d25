"""NVML backend: GPM activity metrics (Hopper and newer), SM clock, processes.

The only module that imports ``pynvml``; every call goes through :func:`nvml_query`, which maps
NVML's errors to :class:`NvmlCallError` with a stable ``kind`` and tolerates functions that an
older driver lacks (the plumbing is shared with DCGM in sampler/base.py). Units are converted
here: MHz -> Hz, percent -> ratio, microseconds -> s.

Timing: GPM is sampled once per ``interval_s`` (NVML requires >= 100 ms between samples); in
between, the SM clock is read every ``clock_period_s`` and averaged over exactly the interval
the GPM metrics cover, so the clock's swings under the power cap stay correlated with the
activity they multiply (shared/gpu-facts.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gpuflops.model import GpuInfo, GpuSample, Metric, ProcessInfo, ProcessUtilSample
from gpuflops.rates import ARCHITECTURE_CODES
from gpuflops.sampler.base import (
    CallError,
    ErrorCounts,
    SamplerError,
    error_kinds,
    host_facts,
    library_call,
    next_deadline,
    unit_info,
    wait_until,
)

log = logging.getLogger(__name__)

# NVML GPM metric ids (nvml.h, NVML_GPM_METRIC_*); values are percentages.
GPM_METRIC_IDS: dict[Metric, int] = {
    Metric.TENSOR_ANY: 5,
    Metric.DFMA: 6,
    Metric.HMMA: 7,
    Metric.IMMA: 9,
    Metric.FP64: 11,
    Metric.FP32: 12,
    Metric.FP16: 13,
    Metric.SM_ACTIVE: 2,
    Metric.SM_OCCUPANCY: 3,
}

MIN_GPM_INTERVAL_S = 0.1
_LOST_RETRY_S = 10.0


class NvmlCallError(CallError):
    """An NVML call failed; ``kind`` is stable across driver versions."""


# NVML return codes by name -> the stable kind gpuflops reports (sampler_errors_total{kind}).
_NVML_ERROR_NAMES = {
    "NVML_ERROR_UNINITIALIZED": "uninitialized",
    "NVML_ERROR_INVALID_ARGUMENT": "invalid_argument",
    "NVML_ERROR_NOT_SUPPORTED": "not_supported",
    "NVML_ERROR_NO_PERMISSION": "no_permission",
    "NVML_ERROR_NOT_FOUND": "not_found",
    "NVML_ERROR_DRIVER_NOT_LOADED": "driver_not_loaded",
    "NVML_ERROR_TIMEOUT": "timeout",
    "NVML_ERROR_LIBRARY_NOT_FOUND": "library_not_found",
    "NVML_ERROR_FUNCTION_NOT_FOUND": "function_not_found",
    "NVML_ERROR_GPU_IS_LOST": "gpu_lost",
    "NVML_ERROR_RESET_REQUIRED": "reset_required",
    "NVML_ERROR_UNKNOWN": "unknown",
}


def nvml_query(nvml: ModuleType, kinds: dict[int, str], function: str, *args: Any) -> Any:
    """Call ``nvml.<function>(*args)``, mapping every failure to NvmlCallError."""
    return library_call(
        nvml, nvml.NVMLError, kinds, NvmlCallError, "not in this nvidia-ml-py", function, *args
    )


def _binding_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:  # not installed as a distribution (vendored copy): not fatal
        return ""


def _load_pynvml() -> ModuleType:
    import pynvml

    return pynvml


@dataclass
class _Unit:
    info: GpuInfo
    handle: Any  # physical device handle (GPM sampling, clocks)
    proc_handle: Any  # handle for process queries (the MIG device handle on MIG)
    samples: list[Any] = field(default_factory=list)  # two GPM sample buffers
    metrics_get: Any = None
    metric_order: tuple[Metric, ...] = ()
    cur: int = 0
    synced: bool = False  # samples[cur] is a valid start for the next interval
    t_prev: float = 0.0
    clock_sum_hz: float = 0.0
    clock_n: int = 0
    processes: tuple[ProcessInfo, ...] = ()
    util_ts_us: int = 0
    pending_util: tuple[ProcessUtilSample, ...] = ()  # read at the last refresh, not yet sent
    gpu_util: float | None = None
    lost_since: float | None = None


class NvmlSampler:
    """A Sampler over NVML GPM. Constructing it initialises NVML and enumerates units."""

    name = "nvml"

    def __init__(
        self,
        *,
        interval_s: float = 0.1,
        clock_period_s: float = 0.02,
        process_period_s: float = 1.0,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        stop: threading.Event | None = None,
        nvml: ModuleType | None = None,
        devices: list[int] | None = None,
    ) -> None:
        if interval_s < MIN_GPM_INTERVAL_S:
            raise SamplerError(f"GPM samples must be >= {MIN_GPM_INTERVAL_S}s apart")
        try:
            self._nvml = nvml or _load_pynvml()
        except ImportError as e:
            raise SamplerError(f"nvidia-ml-py is not installed: {e}") from None
        self._kinds = error_kinds(self._nvml, _NVML_ERROR_NAMES)
        self.interval_s = interval_s
        self._clock_period = max(0.001, min(clock_period_s, interval_s))
        self._process_period = process_period_s
        self._proc_root = proc_root
        self._clock = clock
        self._sleep = sleep
        self._stop = stop or threading.Event()
        self._errors = ErrorCounts(log)
        self._comms: dict[int, str] = {}
        self._own_pid = os.getpid()
        try:
            self._q("nvmlInit")
        except NvmlCallError as e:
            raise SamplerError(
                f"cannot initialise NVML ({e.kind}: {e}); is the NVIDIA driver installed?"
            ) from None
        self._closed = False
        self.driver_version = self._safe_str("nvmlSystemGetDriverVersion")
        self.nvml_version = self._safe_str("nvmlSystemGetNVMLVersion")
        self._units = self._enumerate(devices)
        if not self._units:
            self.close()
            raise SamplerError("NVML reports no GPUs on this node")
        self._physical = {u.info.index: u.handle for u in self._units}
        self._next_proc_refresh = 0.0
        now = self._clock()
        for u in self._units:
            u.t_prev = now
            if u.info.metrics:
                self._gpm_sample(u, now, first=True)
        self._deadline = now + interval_s

    # ------------------------------------------------------------ plumbing

    def _q(self, function: str, *args: Any) -> Any:
        return nvml_query(self._nvml, self._kinds, function, *args)

    def _safe_str(self, function: str, *args: Any) -> str:
        try:
            v = self._q(function, *args)
        except NvmlCallError:
            return ""
        return v.decode() if isinstance(v, bytes) else str(v)

    def _count(self, unit: _Unit, kind: str, message: str) -> None:
        self._errors.count(unit.info.key, kind, message)

    @property
    def errors(self) -> dict[tuple[str, str], int]:
        return self._errors.counts

    # ------------------------------------------------------------ enumeration

    def _enumerate(self, devices: list[int] | None) -> list[_Unit]:
        count = self._q("nvmlDeviceGetCount")
        units: list[_Unit] = []
        for index in range(count):
            if devices is not None and index not in devices:
                continue
            try:
                units.extend(self._units_of(index))
            except NvmlCallError as e:
                # A GPU that fails enumeration is reported, not fatal for the others.
                log.warning("gpu %d: cannot be enumerated (%s); skipping it", index, e)
        return units

    def _units_of(self, index: int) -> list[_Unit]:
        h = self._q("nvmlDeviceGetHandleByIndex", index)
        uuid = self._safe_str("nvmlDeviceGetUUID", h)
        name = self._safe_str("nvmlDeviceGetName", h)
        try:
            arch = ARCHITECTURE_CODES.get(self._q("nvmlDeviceGetArchitecture", h), "unknown")
        except NvmlCallError:
            arch = "unknown"
        gpm_ok, reason = self._gpm_support(h, arch)
        mig = False
        try:
            current, _pending = self._q("nvmlDeviceGetMigMode", h)
            mig = current == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1)
        except NvmlCallError:
            mig = False
        metrics = frozenset(GPM_METRIC_IDS) if gpm_ok else frozenset()
        why = None if gpm_ok else reason
        if not mig:
            info = unit_info(index, uuid, name, arch, self._sm_count(h, arch, name), metrics, why)
            return [self._make_unit(info, h, h)]
        units = []
        for mi in range(self._q("nvmlDeviceGetMaxMigDeviceCount", h)):
            try:
                mh = self._q("nvmlDeviceGetMigDeviceHandleByIndex", h, mi)
            except NvmlCallError as e:
                if e.kind in ("not_found", "invalid_argument"):
                    continue
                raise
            gi = self._q("nvmlDeviceGetGpuInstanceId", mh)
            try:
                sm = int(self._q("nvmlDeviceGetAttributes", mh).multiprocessorCount)
            except NvmlCallError:
                sm = None
            mig_uuid = self._safe_str("nvmlDeviceGetUUID", mh) or uuid
            info = unit_info(index, mig_uuid, name, arch, sm, metrics, why, gpu_instance_id=gi)
            units.append(self._make_unit(info, h, mh))
        return units

    def _gpm_support(self, h: Any, arch: str) -> tuple[bool, str | None]:
        try:
            support = self._q("nvmlGpmQueryDeviceSupport", h)
        except NvmlCallError as e:
            return False, f"GPM not available ({e.kind}); tensor activity unavailable on {arch}"
        if not support.isSupportedDevice:
            return False, f"GPM not supported on this {arch} GPU; tensor activity unavailable"
        return True, None

    def _sm_count(self, h: Any, arch: str, name: str) -> int | None:
        try:
            return int(self._q("nvmlDeviceGetAttributes", h).multiprocessorCount)
        except NvmlCallError:
            pass
        # Pass-through VMs answer NotSupported above (gpu-facts); derive from the core count.
        from gpuflops.rates import family_for

        family = family_for(arch, name)
        try:
            cores = int(self._q("nvmlDeviceGetNumGpuCores", h))
        except NvmlCallError:
            return None
        if family is None or cores % family.cores_per_sm:
            return None
        return cores // family.cores_per_sm

    def _make_unit(self, info: GpuInfo, handle: Any, proc_handle: Any) -> _Unit:
        unit = _Unit(info=info, handle=handle, proc_handle=proc_handle)
        if info.metrics:
            n = self._nvml
            unit.samples = [self._q("nvmlGpmSampleAlloc"), self._q("nvmlGpmSampleAlloc")]
            mg = n.c_nvmlGpmMetricsGet_t()
            mg.version = n.NVML_GPM_METRICS_GET_VERSION
            order = tuple(GPM_METRIC_IDS)
            mg.numMetrics = len(order)
            for i, metric in enumerate(order):
                mg.metrics[i].metricId = GPM_METRIC_IDS[metric]
            unit.metrics_get = mg
            unit.metric_order = order
        return unit

    def pci_bus_ids(self) -> dict[str, str]:
        """PCI bus id of each whole GPU (not MIG instances), by unit key; for CUPTI."""
        out = {}
        for u in self._units:
            if u.info.gpu_instance_id is None:
                try:
                    bus = self._q("nvmlDeviceGetPciInfo", u.handle).busId
                except NvmlCallError as e:
                    self._count(u, f"pci_{e.kind}", f"PCI bus id unavailable: {e}")
                    continue
                out[u.info.key] = bus.decode() if isinstance(bus, bytes) else str(bus)
        return out

    def gpus(self) -> list[GpuInfo]:
        return [u.info for u in self._units]

    # ------------------------------------------------------------ sampling

    def _read_clocks(self) -> None:
        sm_clock = getattr(self._nvml, "NVML_CLOCK_SM", 1)
        by_index: dict[int, float | None] = {}
        for index, h in self._physical.items():
            try:
                by_index[index] = float(self._q("nvmlDeviceGetClockInfo", h, sm_clock)) * 1e6
            except NvmlCallError:
                by_index[index] = None
        for u in self._units:
            hz = by_index.get(u.info.index)
            if hz is not None and u.lost_since is None:
                u.clock_sum_hz += hz
                u.clock_n += 1

    def _gpm_sample(self, u: _Unit, now: float, first: bool = False) -> NvmlCallError | None:
        nxt = 1 - u.cur if u.synced else u.cur
        try:
            if u.info.gpu_instance_id is None:
                self._q("nvmlGpmSampleGet", u.handle, u.samples[nxt])
            else:
                self._q("nvmlGpmMigSampleGet", u.handle, u.info.gpu_instance_id, u.samples[nxt])
        except NvmlCallError as e:
            u.synced = False
            return e
        if first or not u.synced:
            u.cur = nxt
            u.synced = True
        return None

    def _metrics(self, u: _Unit, first: int, second: int) -> dict[Metric, float]:
        mg = u.metrics_get
        mg.sample1 = u.samples[first]
        mg.sample2 = u.samples[second]
        self._q("nvmlGpmMetricsGet", mg)
        ok = getattr(self._nvml, "NVML_SUCCESS", 0)
        out: dict[Metric, float] = {}
        for i, metric in enumerate(u.metric_order):
            m = mg.metrics[i]
            if m.nvmlReturn == ok:
                out[metric] = min(max(float(m.value) / 100.0, 0.0), 1.0)
        return out

    def _sample_unit(self, u: _Unit, t: float) -> GpuSample:
        t0 = u.t_prev
        clock_hz = u.clock_sum_hz / u.clock_n if u.clock_n else None
        reads = u.clock_n
        u.t_prev, u.clock_sum_hz, u.clock_n = t, 0.0, 0
        common: dict[str, Any] = {
            "key": u.info.key,
            "t0_s": t0,
            "t1_s": t,
            "clock_hz": clock_hz,
            "clock_reads": reads,
            "processes": u.processes,
            "process_util": self._take_process_util(u),
            "gpu_util": u.gpu_util,
        }
        u.gpu_util = None
        if not u.info.metrics:
            return GpuSample(activity=None, error="tensor_activity_unavailable", **common)
        if u.lost_since is not None and t - u.lost_since < _LOST_RETRY_S:
            return GpuSample(activity=None, error="gpu_lost", **common)
        was_synced = u.synced
        err = self._gpm_sample(u, t)
        if err is not None:
            if err.kind == "gpu_lost":
                u.lost_since = t
            self._count(u, err.kind, f"GPM sample failed: {err}")
            return GpuSample(activity=None, error=err.kind, **common)
        u.lost_since = None
        if not was_synced:
            # First good sample after a failure: it starts the next interval; this one is a gap.
            return GpuSample(activity=None, error="resync", **common)
        nxt = 1 - u.cur
        try:
            activity = self._metrics(u, u.cur, nxt)
        except NvmlCallError as e:
            u.cur = nxt
            self._count(u, e.kind, f"GPM metrics failed: {e}")
            return GpuSample(activity=None, error=e.kind, **common)
        u.cur = nxt
        if not activity:
            self._count(u, "no_metrics", "GPM returned no metric for this interval")
            return GpuSample(activity=None, error="no_metrics", **common)
        return GpuSample(activity=activity, **common)

    @staticmethod
    def _take_process_util(u: _Unit) -> tuple[ProcessUtilSample, ...]:
        pending, u.pending_util = u.pending_util, ()
        return pending

    def _refresh_processes(self) -> None:
        for u in self._units:
            if u.lost_since is not None:
                continue
            try:
                running = self._q("nvmlDeviceGetComputeRunningProcesses", u.proc_handle)
                procs = []
                for p in running:
                    mem = getattr(p, "usedGpuMemory", None)
                    pid = int(p.pid)
                    if pid == self._own_pid:
                        continue  # the daemon's own CUDA context (PM sampling) is no job
                    procs.append(ProcessInfo(pid, self._comm(pid), mem if mem else None))
                u.processes = tuple(sorted(procs, key=lambda p: p.pid))
            except NvmlCallError as e:
                self._count(u, f"processes_{e.kind}", f"process list unavailable: {e}")
            # Per-process utilisation only matters when processes share the unit, and it is
            # the costliest call here (~2 ms of CPU on an H100 host): skip it otherwise. The
            # driver keeps recent samples, so the first call after a second process appears
            # still returns the samples that cover its start.
            if len(u.processes) > 1:
                u.pending_util = (*u.pending_util, *self._process_util(u))
            try:
                u.gpu_util = float(self._q("nvmlDeviceGetUtilizationRates", u.handle).gpu) / 100
            except NvmlCallError:
                u.gpu_util = None
        live = {p.pid for u in self._units for p in u.processes}
        for pid in [pid for pid in self._comms if pid not in live]:
            del self._comms[pid]

    def _process_util(self, u: _Unit) -> list[ProcessUtilSample]:
        try:
            raw = self._q("nvmlDeviceGetProcessUtilization", u.proc_handle, u.util_ts_us)
        except NvmlCallError as e:
            if e.kind != "not_found":  # NotFound = no new sample since util_ts_us
                self._count(u, f"process_util_{e.kind}", f"process utilisation failed: {e}")
            return []
        fresh = []
        for s in raw:
            ts = int(s.timeStamp)
            if ts <= u.util_ts_us:
                continue
            fresh.append(ProcessUtilSample(int(s.pid), ts / 1e6, float(s.smUtil) / 100.0))
        u.util_ts_us = max([u.util_ts_us, *(int(s.timeStamp) for s in raw)])
        return fresh

    def _comm(self, pid: int) -> str:
        """Process name, read once per pid while it runs on a GPU."""
        comm = self._comms.get(pid)
        if comm is None:
            try:
                comm = (self._proc_root / str(pid) / "comm").read_text().strip()
            except OSError:
                comm = ""
            self._comms[pid] = comm
        return comm

    def sample(self) -> list[GpuSample]:
        if self._closed:
            raise StopIteration
        deadline = self._deadline
        wait_until(deadline, clock=self._clock, sleep=self._sleep, stop=self._stop,
                   period_s=self._clock_period, tick=self._read_clocks)
        t = self._clock()
        # Half an interval of slack: samples land on the interval grid, and a refresh due at
        # exactly a grid point must not slip to the next one (1.1 s periods instead of 1 s).
        if t >= self._next_proc_refresh - self.interval_s / 2:
            self._refresh_processes()
            self._next_proc_refresh = t + self._process_period
        out = [self._sample_unit(u, t) for u in self._units]
        self._deadline = next_deadline(deadline + self.interval_s, self._clock, self.interval_s)
        return out

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._stop.set()
        for u in getattr(self, "_units", []):
            for s in u.samples:
                with contextlib.suppress(NvmlCallError):
                    self._q("nvmlGpmSampleFree", s)
        with contextlib.suppress(NvmlCallError):
            self._q("nvmlShutdown")

    def describe(self) -> dict[str, Any]:
        """Facts for a trace header: driver, NVML and binding versions, host."""
        return {
            "driver_version": self.driver_version,
            "nvml_version": self.nvml_version,
            "nvidia_ml_py": _binding_version(),
            **host_facts(),
            "clock_period_s": self._clock_period,
            "process_period_s": self._process_period,
        }
