"""Splits each GPU interval's FLOPs among the compute processes that ran on it.

- No FLOPs: nothing to split.
- One compute process on the unit: all of it.
- None seen: all of it goes to the unattributed series (a process in a pid namespace we cannot
  see, or one that came and went between process-list refreshes).
- Several: split in proportion to each process's SM utilisation from the driver's
  per-process samples (about 1 s windows), weighted by how much of each window overlaps the
  interval. Those samples arrive late, so the interval waits (up to ``hold_s``) until a sample
  covering its end exists; then it is split with whatever overlaps, and if nothing does, it is
  unattributed. SM utilisation is the share of time a process had a kernel running; splitting
  by it assumes processes sharing a GPU achieve similar FLOPs per busy SM-second. See
  docs/attribution.md for the limits of this.

On a MIG unit only that instance's processes are listed, so the split is exact per instance.
Nothing is dropped: every FLOP of the input reaches exactly one process or the unattributed
series (the shares of a split always sum to 1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from gpuflops.integrate.integrator import IntervalFlops
from gpuflops.model import GpuSample, Pipe, ProcessInfo, ProcessUtilSample

_HISTORY_S = 60.0
_DEFAULT_WINDOW_S = 1.0
_MAX_WINDOW_S = 3.5


@dataclass(frozen=True)
class Share:
    """FLOPs of one interval, one pipe and precision, given to a pid (None = unattributed)."""

    pid: int | None
    comm: str
    pipe: Pipe
    precision: str
    flops: float


@dataclass(frozen=True)
class AttributedInterval:
    key: str
    t0_s: float
    t1_s: float
    shares: tuple[Share, ...]
    method: str  # "single", "none_seen", "sm_util", "no_util_data", "idle"


@dataclass(frozen=True)
class _UtilWindow:
    pid: int
    start_s: float
    end_s: float
    sm_util: float


@dataclass
class _Pending:
    flops: IntervalFlops
    processes: tuple[ProcessInfo, ...]
    since_s: float


class ProcessAttributor:
    """Per-unit state: process-utilisation history and intervals waiting for it."""

    def __init__(self, hold_s: float = 4.0, smooth_s: float = 0.5) -> None:
        if hold_s < smooth_s:
            raise ValueError("hold_s must cover smooth_s: later samples are needed to split")
        self._hold_s = hold_s
        self._smooth_s = smooth_s
        self._util: dict[str, deque[_UtilWindow]] = {}
        self._last_ts: dict[str, dict[int, float]] = {}
        self._latest: dict[str, float] = {}
        self._pending: dict[str, deque[_Pending]] = {}
        self._comm: dict[int, str] = {}

    def add(self, sample: GpuSample, flops: IntervalFlops) -> list[AttributedInterval]:
        """Take one interval; return every interval now settled (this one or held ones)."""
        key = sample.key
        for p in sample.processes:
            if p.comm:
                self._comm[p.pid] = p.comm
        self._record_util(key, sample.process_util)
        out = self._settle(key, now_s=sample.t1_s, force=False)
        pending = self._pending.setdefault(key, deque())
        if flops.total == 0 and not pending:
            out.append(AttributedInterval(key, flops.t0_s, flops.t1_s, (), "idle"))
        elif len(sample.processes) <= 1 and not pending:
            out.append(self._direct(flops, sample.processes))
        else:
            pending.append(_Pending(flops, sample.processes, sample.t1_s))
            out.extend(self._settle(key, now_s=sample.t1_s, force=False))
        return out

    def flush(self) -> list[AttributedInterval]:
        """Settle everything still held (shutdown)."""
        out: list[AttributedInterval] = []
        for key in list(self._pending):
            out.extend(self._settle(key, now_s=float("inf"), force=True))
        return out

    def held(self) -> int:
        return sum(len(q) for q in self._pending.values())

    # ------------------------------------------------------------------

    def _record_util(self, key: str, samples: tuple[ProcessUtilSample, ...]) -> None:
        hist = self._util.setdefault(key, deque())
        last = self._last_ts.setdefault(key, {})
        for u in sorted(samples, key=lambda u: u.timestamp_s):
            prev = last.get(u.pid)
            if prev is not None and prev >= u.timestamp_s:
                continue  # a duplicate delivery
            # The driver samples each process about once a second and reports its share of
            # the time since that process's previous sample (measured on an H100: samples of
            # different processes interleave, so the GPU-wide sample times are not windows).
            start = prev if prev is not None and u.timestamp_s - prev <= _MAX_WINDOW_S else (
                u.timestamp_s - _DEFAULT_WINDOW_S
            )
            last[u.pid] = u.timestamp_s
            hist.append(_UtilWindow(u.pid, start, u.timestamp_s, u.sm_util))
            self._latest[key] = max(self._latest.get(key, float("-inf")), u.timestamp_s)
        if hist:
            horizon = hist[-1].end_s - _HISTORY_S
            while hist and hist[0].end_s < horizon:
                hist.popleft()

    def _settle(self, key: str, now_s: float, force: bool) -> list[AttributedInterval]:
        q = self._pending.get(key)
        out: list[AttributedInterval] = []
        while q:
            p = q[0]
            # Wait until every process's sample covering the interval can have arrived.
            if not (force or now_s - p.since_s >= self._hold_s):
                break
            q.popleft()
            if p.flops.total == 0:
                out.append(AttributedInterval(key, p.flops.t0_s, p.flops.t1_s, (), "idle"))
            elif len(p.processes) <= 1:
                out.append(self._direct(p.flops, p.processes))
            else:
                out.append(self._split(key, p))
        return out

    def _direct(
        self, flops: IntervalFlops, processes: tuple[ProcessInfo, ...]
    ) -> AttributedInterval:
        if processes:
            proc = processes[0]
            shares = _shares(flops.flops, {proc.pid: 1.0}, self._comm)
            return AttributedInterval(flops.key, flops.t0_s, flops.t1_s, shares, "single")
        shares = _shares(flops.flops, {}, self._comm)
        return AttributedInterval(flops.key, flops.t0_s, flops.t1_s, shares, "none_seen")

    def _split(self, key: str, p: _Pending) -> AttributedInterval:
        t0, t1 = p.flops.t0_s, p.flops.t1_s
        # Per-process samples are ~1 s long and noisy (a process can miss a sample while it
        # runs); shares are taken over the interval widened by smooth_s on each side.
        lo, hi = t0 - self._smooth_s, t1 + self._smooth_s
        weights: dict[int, float] = {}
        for w in self._util.get(key, ()):
            overlap = min(hi, w.end_s) - max(lo, w.start_s)
            if overlap > 0 and w.sm_util > 0:
                weights[w.pid] = weights.get(w.pid, 0.0) + overlap * w.sm_util
        total = sum(weights.values())
        if total <= 0:
            shares = _shares(p.flops.flops, {}, self._comm)
            return AttributedInterval(key, t0, t1, shares, "no_util_data")
        fractions = {pid: w / total for pid, w in weights.items()}
        return AttributedInterval(key, t0, t1, _shares(p.flops.flops, fractions, self._comm), "sm_util")


def _shares(
    flops: Mapping[tuple[Pipe, str], float], fractions: Mapping[int, float], comm: Mapping[int, str]
) -> tuple[Share, ...]:
    out: list[Share] = []
    for (pipe, precision), value in flops.items():
        if value == 0:
            continue
        if not fractions:
            out.append(Share(None, "", pipe, precision, value))
            continue
        for pid, frac in fractions.items():
            out.append(Share(pid, comm.get(pid, ""), pipe, precision, value * frac))
    return tuple(out)
