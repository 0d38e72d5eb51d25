"""CUPTI PM sampling: the SMs' real cycles and the tensor pipes' active cycles, device-wide.

The only module that imports ``cupti`` (NVIDIA's cupti-python) and ``cuda.bindings``.

Why: NVML's SM clock runs ahead of the clock the SMs actually tick at under load (10-14% under
an H200's power cap, about 4% without it; docs/accuracy.md), and GPM's tensor activity times a
clock can only be as right as that clock. PM sampling reads two hardware counters from another
process, every ``period_s``, for the whole device:

- ``sm__cycles_elapsed.max``: SM cycles that elapsed, so cycles / seconds is the real clock;
- ``sm__pipe_tensor_cycles_active.sum``: cycles the tensor pipes were busy, summed over the SM
  sub-partitions. On Hopper one such cycle of a wgmma kernel is 1024 bf16/fp16 FLOPs, 2048 fp8
  and 512 tf32: a quarter of the SM's dense rate per clock (Nsight Compute's executed-ops
  counters against these cycles, run 21). No clock enters that product at all.

Costs and conflicts, measured on an H200 (driver 580, run 21): the CUDA context this needs takes
527 MiB of the GPU's memory and shows the daemon as a compute process; while PM sampling holds a
GPU's counters, ``ncu`` on that GPU fails ("a driver resource was unavailable"), and the reverse
holds for us. So a GPU whose counters are taken (a profiler, DCGM profiling) is a *fallback*,
counted and retried, never a stop: the sampler then integrates with NVML's clock as before.

Timestamps: PM samples carry the GPU's global timer in ns, which on these drivers follows the
host's wall clock; the offset is re-estimated at every decode (the smallest host-minus-newest-
sample lag seen) so a GPU whose timer does not follow still maps correctly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

PM_METRICS = ("sm__cycles_elapsed.max", "sm__pipe_tensor_cycles_active.sum")
DEFAULT_PERIOD_S = 0.05
# A window that PM samples cover less than this share of is not used (the interval falls back
# to NVML's clock): a partial count would be extrapolated, and extrapolation is not measurement.
MIN_COVERAGE = 0.9
_KEEP_S = 30.0  # samples older than this behind the newest are dropped unread


class PmError(Exception):
    """PM sampling cannot start or continue on a device; ``kind`` is stable, for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PmSample:
    """One PM sample: [t0_s, t1_s] wall clock, and the two counters over it."""

    t0_s: float
    t1_s: float
    sm_cycles: float
    tensor_cycles: float


@dataclass(frozen=True)
class PmWindow:
    """PM counts over the span a sampling interval asked for."""

    t0_s: float
    t1_s: float
    covered_s: float  # seconds of [t0_s, t1_s] that samples cover
    sm_cycles: float  # SM cycles elapsed over the covered part (max over SMs)
    tensor_cycles: float  # tensor pipe active cycles over the covered part (sum over SMSPs)

    @property
    def clock_hz(self) -> float | None:
        return self.sm_cycles / self.covered_s if self.covered_s > 0 else None


class PmDevice(Protocol):
    """One GPU's PM sampling session (the CUPTI boundary; tests fake it)."""

    def read(self) -> list[tuple[int, int, float, float]]:
        """Samples completed since the last read: (start_ns, end_ns, sm_cycles, tensor_cycles)."""
        ...

    def close(self) -> None: ...


PmOpener = Callable[[str, float], PmDevice]  # (PCI bus id, period_s) -> started session


@dataclass
class _Device:
    key: str
    bus_id: str
    session: PmDevice | None = None
    samples: deque[PmSample] = field(default_factory=deque)
    cursor_s: float | None = None  # end of the span the last window consumed
    offset_s: float | None = None  # host minus GPU timer, smallest lag seen
    retry_at: float = 0.0
    reason: str | None = "not started"
    held_by: str | None = None  # a profiler we yield the counters to
    warned: set[str] = field(default_factory=set)


class PmSampling:
    """Per-GPU PM sampling sessions, read on demand by the sampling thread.

    ``devices`` maps each GPU's key to its PCI bus id. Nothing here raises to the caller after
    construction: a device that cannot be sampled answers ``None`` from :meth:`window`, with a
    reason from :meth:`status`, and is retried every ``retry_s``.
    """

    def __init__(
        self,
        devices: Mapping[str, str],
        opener: PmOpener,
        *,
        period_s: float = DEFAULT_PERIOD_S,
        retry_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open = opener
        self._period = period_s
        self._retry = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._devices = {k: _Device(k, bus) for k, bus in devices.items()}
        self.errors: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ life cycle

    def _count(self, d: _Device, kind: str, message: str) -> None:
        key = (d.key, f"pm_{kind}")
        self.errors[key] = self.errors.get(key, 0) + 1
        if kind in d.warned:
            log.debug("gpu %s: PM sampling: %s", d.key, message)
        else:
            d.warned.add(kind)
            log.warning("gpu %s: PM sampling: %s; using NVML's clock meanwhile (further "
                        "occurrences at debug)", d.key, message)

    def _ensure_open(self, d: _Device, now: float) -> None:
        if d.session is not None or d.held_by is not None or now < d.retry_at:
            return
        try:
            d.session = self._open(d.bus_id, self._period)
        except PmError as e:
            d.reason, d.retry_at = e.kind, now + self._retry
            self._count(d, e.kind, str(e))
            return
        d.reason, d.cursor_s = None, None
        d.samples.clear()
        log.info("gpu %s: PM sampling started (%s every %.0f ms)", d.key, ", ".join(PM_METRICS),
                 self._period * 1e3)

    def _drop(self, d: _Device, reason: str) -> None:
        if d.session is not None:
            try:
                d.session.close()
            except PmError as e:
                self._count(d, e.kind, f"close failed: {e}")
        d.session, d.reason, d.cursor_s = None, reason, None
        d.samples.clear()

    def start(self) -> None:
        """Open every device now (failures are reasons, not errors)."""
        now = self._clock()
        with self._lock:
            for d in self._devices.values():
                self._ensure_open(d, now)

    def hold(self, key: str, by: str) -> None:
        """Give a GPU's counters to a profiler (``by`` names it) until :meth:`release`."""
        with self._lock:
            d = self._devices.get(key)
            if d is None or d.held_by == by:
                return
            d.held_by = by
            self._drop(d, "yielded_to_profiler")
            log.info("gpu %s: PM counters yielded to %s", key, by)

    def release(self, key: str) -> None:
        with self._lock:
            d = self._devices.get(key)
            if d is None or d.held_by is None:
                return
            log.info("gpu %s: profiler %s gone; PM sampling resumes", key, d.held_by)
            d.held_by, d.retry_at = None, 0.0

    def close(self) -> None:
        with self._lock:
            for d in self._devices.values():
                self._drop(d, "closed")

    # ------------------------------------------------------------ reading

    def _read(self, d: _Device, now: float) -> None:
        assert d.session is not None
        try:
            raw = d.session.read()
        except PmError as e:
            self._count(d, e.kind, f"read failed: {e}")
            self._drop(d, e.kind)
            d.retry_at = now + self._retry
            return
        if not raw:
            return
        lag = now - raw[-1][1] / 1e9
        d.offset_s = lag if d.offset_s is None else min(d.offset_s, lag)
        off = d.offset_s
        for s0, s1, cyc, tensor in raw:
            if s1 <= s0 or cyc < 0 or tensor < 0:
                self._count(d, "bad_sample", f"sample ignored: {(s0, s1, cyc, tensor)}")
                continue
            d.samples.append(PmSample(s0 / 1e9 + off, s1 / 1e9 + off, cyc, tensor))
        while d.samples and d.samples[0].t1_s < d.samples[-1].t1_s - _KEEP_S:
            d.samples.popleft()

    def window(self, key: str, t0_s: float, t1_s: float) -> PmWindow | None:
        """PM counts for the interval [t0_s, t1_s] that just ended, or None to fall back.

        Reads the device first, so samples up to about one period before ``t1_s`` are in.
        Consecutive windows of a device continue where the previous one stopped (at the newest
        sample it used), so every PM sample is counted once even though the last one of an
        interval is still open when the interval ends.
        """
        now = self._clock()
        with self._lock:
            d = self._devices.get(key)
            if d is None:
                return None
            self._ensure_open(d, now)
            if d.session is None:
                return None
            self._read(d, now)
            if d.session is None or not d.samples:
                return None
            start = t0_s if d.cursor_s is None else max(d.cursor_s, t0_s - 2 * self._period)
            end = min(t1_s, d.samples[-1].t1_s)
            covered = cyc = tensor = 0.0
            for s in d.samples:
                ov = min(s.t1_s, end) - max(s.t0_s, start)
                if ov <= 0:
                    continue
                f = ov / (s.t1_s - s.t0_s)
                covered += ov
                cyc += f * s.sm_cycles
                tensor += f * s.tensor_cycles
            while d.samples and d.samples[0].t1_s <= end:
                d.samples.popleft()
            d.cursor_s = end
        span = t1_s - t0_s
        if span <= 0 or covered < MIN_COVERAGE * span:
            with self._lock:
                self._count(d, "partial_window",
                            f"samples cover {covered:.3f}s of a {span:.3f}s interval")
            return None
        return PmWindow(start, end, covered, cyc, tensor)

    def status(self) -> dict[str, str | None]:
        """Per GPU key: None while sampling, else why not (a stable kind)."""
        with self._lock:
            return {k: (("held_by_" + d.held_by) if d.held_by else d.reason)
                    for k, d in self._devices.items()}


# ---------------------------------------------------------------- profiler detection

# Set in the environment of every process that Nsight Compute or Nsight Systems launches or
# injects into (read off ncu 2025.3's targets, run 21), and by CUDA's generic tool injection.
PROFILER_ENV_MARKERS = (
    b"NV_NSIGHT_INJECTION_TRANSPORT_TYPE=",
    b"NV_COMPUTE_PROFILER_PERFWORKS_DIR=",
    b"CUDA_INJECTION64_PATH=",
)


class ProfilerWatch:
    """Finds processes that run under a CUDA profiler, from their environment in /proc.

    Reads each pid's environ once (a process's initial environment does not change), so a
    scan costs one directory listing plus the new pids.
    """

    def __init__(self, proc_root: Path = Path("/proc"), own_pid: int | None = None) -> None:
        self._root = proc_root
        self._own = os.getpid() if own_pid is None else own_pid
        self._seen: dict[int, str | None] = {}

    def _profiler_of(self, pid: int) -> str | None:
        try:
            env = (self._root / str(pid) / "environ").read_bytes()
        except OSError:
            return None
        for marker in PROFILER_ENV_MARKERS:
            if (b"\0" + marker) in (b"\0" + env):
                try:
                    comm = (self._root / str(pid) / "comm").read_text().strip()
                except OSError:
                    comm = ""
                return f"pid {pid} ({comm}, {marker[:-1].decode()})"
        return None

    def scan(self) -> dict[int, str]:
        """Live processes under a profiler: pid -> description."""
        try:
            pids = {int(p.name) for p in self._root.iterdir() if p.name.isdigit()}
        except OSError:
            return {}
        pids.discard(self._own)
        for gone in set(self._seen) - pids:
            del self._seen[gone]
        for pid in pids - set(self._seen):
            self._seen[pid] = self._profiler_of(pid)
        return {pid: d for pid, d in self._seen.items() if d is not None}


# ---------------------------------------------------------------- the real CUPTI


def _preload(paths: Iterable[Path]) -> None:
    # CUPTI 13.3's profiler initialisation segfaulted on driver 580 unless its own libraries
    # and the nvperf ones were loaded into the global namespace first (run 21: what `import
    # torch` does as a side effect; loading libcudart alone did not help).
    for p in paths:
        ctypes.CDLL(str(p), mode=os.RTLD_GLOBAL)


def _cupti_libraries() -> list[Path]:
    """libnvperf_host, libnvperf_target and libcupti from the nvidia-cuda-cupti distribution
    whose version cupti-python was built for."""
    from importlib import metadata

    try:
        want = metadata.version("cupti-python")
        dist = metadata.distribution("nvidia-cuda-cupti")
    except metadata.PackageNotFoundError as e:
        raise PmError("not_installed", f"{e.name} is not installed (pip install "
                      "'gpuflops[cupti]')") from None
    have = dist.version
    if want.split(".")[:2] != have.split(".")[:2]:
        raise PmError("version_mismatch", f"cupti-python {want} needs nvidia-cuda-cupti "
                      f"{'.'.join(want.split('.')[:2])}.x, found {have}")
    files = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in dist.files or ()}
    order = ("libnvperf_host.so", "libnvperf_target.so")
    found = [files[n] for n in order if n in files]
    found += [p for n, p in files.items() if n.startswith("libcupti.so.")][:1]
    if len(found) != 3:
        raise PmError("not_installed", f"nvidia-cuda-cupti {have} lacks the profiler libraries")
    return found


class CuptiOpener:
    """Opens PM sampling sessions with NVIDIA's cupti-python (13.3 or newer)."""

    def __init__(self, hardware_buffer_bytes: int = 32 << 20) -> None:
        self._buffer = hardware_buffer_bytes
        _preload(_cupti_libraries())
        try:
            from cuda.bindings import driver
            from cupti import pm_sampling
        except ImportError as e:
            raise PmError("not_installed", f"cupti-python is not usable: {e}") from None
        self._cu = driver
        self._pm = pm_sampling
        (err,) = driver.cuInit(0)
        if int(err) != 0:
            raise PmError("cuda_init", f"cuInit failed: {err}")

    def __call__(self, bus_id: str, period_s: float) -> PmDevice:
        cu = self._cu
        err, dev = cu.cuDeviceGetByPCIBusId(bus_id.encode())
        if int(err) != 0:
            raise PmError("no_device", f"no CUDA device at {bus_id}: {err}")
        err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
        if int(err) != 0:
            raise PmError("context", f"cannot create a CUDA context on {bus_id}: {err}")
        try:
            (err,) = cu.cuCtxSetCurrent(ctx)
            collector = self._pm.Collector(int(dev))
            collector.enable()
            collector.configure(metrics=list(PM_METRICS),
                                sampling_interval=int(period_s * 1e9),
                                hardware_buffer_size=self._buffer)
            collector.start()
        except (RuntimeError, ValueError, MemoryError, PermissionError) as e:
            cu.cuDevicePrimaryCtxRelease(dev)
            kind = "permission" if isinstance(e, PermissionError) else "counters_unavailable"
            raise PmError(kind, f"{type(e).__name__}: {e}") from None
        except Exception as e:  # cupti.cupti.cuptiError, whose module this file alone loads
            cu.cuDevicePrimaryCtxRelease(dev)
            raise PmError("cupti_error", f"{type(e).__name__}: {e}") from None
        return _CuptiSession(collector, cu, dev, ctx)


class _CuptiSession:
    def __init__(self, collector: object, cu: object, dev: object, ctx: object) -> None:
        self._c = collector
        self._cu = cu
        self._dev = dev
        self._ctx = ctx

    def read(self) -> list[tuple[int, int, float, float]]:
        self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
        try:
            data = self._c.decode(max_samples=4096)  # type: ignore[attr-defined]
            return [(int(s.start_timestamp), int(s.end_timestamp), float(s.metric_values[0]),
                     float(s.metric_values[1])) for s in data]
        except Exception as e:  # cuptiError (see above), MemoryError on buffer overflow
            raise PmError("decode", f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        try:
            self._cu.cuCtxSetCurrent(self._ctx)  # type: ignore[attr-defined]
            self._c.stop()  # type: ignore[attr-defined]
        except Exception as e:
            log.debug("PM sampling stop: %s", e)
        finally:
            self._c.disable()  # type: ignore[attr-defined]
            self._cu.cuDevicePrimaryCtxRelease(self._dev)  # type: ignore[attr-defined]
