"""PM sampling as a counter source: per-GPU sessions, windows that match sampling intervals.

Why: NVML's SM clock runs ahead of the clock the SMs actually tick at under load (10-14% under
an H200's power cap, about 4% without it; docs/accuracy.md), and GPM's tensor activity times a
clock can only be as right as that clock. CUPTI PM sampling reads two hardware counters from
another process, every ``period_s``, for the whole device:

- ``sm__cycles_elapsed.max``: SM cycles that elapsed, so cycles / seconds is the real clock;
- ``sm__pipe_tensor_cycles_active.sum``: cycles the tensor pipes were busy, summed over the SM
  sub-partitions. On Hopper one such cycle of a wgmma kernel is 1024 bf16/fp16 FLOPs, 2048 fp8
  and 512 tf32: a quarter of the SM's dense rate per clock (Nsight Compute's executed-ops
  counters against these cycles, run 21). No clock enters that product at all.

Conflicts, measured on an H200 (driver 580, run 21): while PM sampling holds a GPU's counters,
``ncu`` on that GPU fails ("a driver resource was unavailable"), and the reverse holds for us.
So a GPU whose counters are taken (a profiler, DCGM profiling) is a *fallback*, counted and
retried, never a stop: the interval is then integrated with NVML's clock as before. And since
the daemon cannot know in advance when someone profiles, it watches for processes that run under
Nsight tools and yields the counters to them (:class:`ProfilerWatch`, :class:`PmCountedSampler`).

Timestamps: PM samples carry the GPU's global timer in ns, which on these drivers follows the
host's wall clock; the offset is re-estimated at every read (the smallest host-minus-newest-
sample lag seen) so a GPU whose timer does not follow still maps correctly.

The CUPTI calls themselves live in sampler/cupti.py, the only module that imports cupti.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpuflops.model import COUNTER_SOURCE_PM, GpuInfo, GpuSample
from gpuflops.sampler.base import Sampler

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

    @property
    def pid(self) -> int | None:
        """The worker process holding the session's CUDA context; None: this process."""
        ...

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

        Reads what the device has delivered, which lags the interval's end by up to a decode
        period of the worker (~0.1 s) plus one sample. Consecutive windows of a device continue
        where the previous one stopped (at the newest sample it used), so every PM sample is
        counted once: an interval's window is [previous end, newest sample end], shifted from
        the interval by that lag, never losing or repeating a sample. It is used when samples
        cover at least MIN_COVERAGE of it and it spans at least half the interval; otherwise
        (a stalled or restarted worker, a hole in the samples) the interval falls back.
        """
        now = self._clock()
        span = t1_s - t0_s
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
            # Continue from the previous window unless it ended more than an interval ago.
            start = t0_s if d.cursor_s is None or d.cursor_s < t0_s - span else d.cursor_s
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
            d.cursor_s = max(end, start)
        if span <= 0 or end - start < 0.5 * span or covered < MIN_COVERAGE * (end - start):
            with self._lock:
                self._count(d, "partial_window",
                            f"samples cover {covered:.3f}s of a {span:.3f}s interval")
            return None
        return PmWindow(start, end, covered, cyc, tensor)

    def worker_pids(self) -> set[int]:
        """Processes that hold PM sessions for us: they run on the GPUs but are no job."""
        with self._lock:
            return {p for d in self._devices.values() if d.session is not None
                    and (p := d.session.pid) is not None}

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




# ---------------------------------------------------------------- the sampler it feeds


class PmCountedSampler:
    """A Sampler that adds PM cycle counts to another sampler's intervals.

    Every interval the inner sampler (NVML GPM) ends is matched with the PM window of its GPU;
    the sample then carries the SM cycles and tensor-pipe cycles, and ``counter_source`` says
    so. An interval PM cannot cover (not started, counters taken, partial window, MIG instance:
    PM sampling is device-wide) keeps NVML's clock, unchanged. While any process on the node
    runs under an Nsight profiler the counters are yielded on every GPU (we cannot tell which
    GPU a not-yet-started target will use) and taken back once it has gone.
    """

    def __init__(self, inner: Sampler, pm: PmSampling, *, watch: ProfilerWatch | None = None,
                 watch_period_s: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self._inner = inner
        self._pm = pm
        self._watch = watch
        self._watch_period = watch_period_s
        self._clock = clock
        self._next_watch = 0.0
        self._holding: str | None = None
        self.name = inner.name
        self._whole = {g.key for g in inner.gpus() if g.gpu_instance_id is None}

    @property
    def interval_s(self) -> float | None:
        return self._inner.interval_s

    @property
    def errors(self) -> Mapping[tuple[str, str], int]:
        return {**self._inner.errors, **self._pm.errors}

    def status(self) -> dict[str, str | None]:
        """Per whole GPU: None while PM counts it, else why not."""
        return self._pm.status()

    def gpus(self) -> list[GpuInfo]:
        return self._inner.gpus()

    def _watch_profilers(self) -> None:
        now = self._clock()
        if self._watch is None or now < self._next_watch:
            return
        self._next_watch = now + self._watch_period
        found = self._watch.scan()
        holder = next(iter(sorted(found.values())), None)
        if holder == self._holding:
            return
        for key in self._whole:
            if holder is None:
                self._pm.release(key)
            else:
                self._pm.hold(key, holder)
        self._holding = holder

    def sample(self) -> list[GpuSample]:
        samples = self._inner.sample()
        self._watch_profilers()
        workers = self._pm.worker_pids()
        out = []
        for s in samples:
            if workers and any(p.pid in workers for p in s.processes):
                s = dataclasses.replace(
                    s, processes=tuple(p for p in s.processes if p.pid not in workers),
                    process_util=tuple(u for u in s.process_util if u.pid not in workers))
            w = (self._pm.window(s.key, s.t0_s, s.t1_s)
                 if s.key in self._whole and s.activity is not None else None)
            if w is not None:
                s = dataclasses.replace(s, counter_source=COUNTER_SOURCE_PM,
                                        counter_span_s=w.covered_s, sm_cycles=w.sm_cycles,
                                        tensor_cycles=w.tensor_cycles)
            out.append(s)
        return out

    def describe(self) -> dict[str, Any]:
        return {**self._inner.describe(), "counter_source": "cupti_pm",
                "pm_metrics": list(PM_METRICS)}

    def close(self) -> None:
        try:
            self._pm.close()
        finally:
            self._inner.close()
