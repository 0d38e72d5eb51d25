"""Splits each GPU interval's FLOPs among the compute processes that ran on it.

- No FLOPs: nothing to split.
- One compute process on the unit: all of it.
- None seen: all of it goes to the unattributed series (a process in a pid namespace we cannot
  see, or one that came and went between process-list refreshes).
- Several, and every process the driver saw running publishes analytic FLOPs through the job
  socket (``record_analytic``): split in proportion to the analytic FLOPs each process reported
  for the interval (``analytic``), provided their sum is plausible against the measured FLOPs
  (within ``analytic_tolerance``). The measured total is kept; only the proportions come from
  the jobs.
- Several, otherwise: split in proportion to each process's SM utilisation from the driver's
  per-process samples, weighted by how much of each sample's window overlaps the interval
  (``sm_util``); if no sample overlaps, unattributed (``no_util_data``). SM utilisation is the
  share of time a process had a kernel running, sampled by the driver about 5 times a second;
  splitting by it assumes processes sharing a GPU achieve similar FLOPs per busy SM-second.
- Per-process samples and analytic reports arrive late, so a shared interval waits ``hold_s``
  before it is split. See docs/attribution.md for the measured limits of both methods.

On a MIG unit only that instance's processes are listed, so the split is exact per instance.
Nothing is dropped: every FLOP of the input reaches exactly one process or the unattributed
series (the shares of a split always sum to 1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from gpuflops.model import (
    AttributedInterval,
    GpuSample,
    IntervalFlops,
    Pipe,
    ProcessInfo,
    ProcessUtilSample,
    Share,
)

_HISTORY_S = 60.0
_DEFAULT_WINDOW_S = 1.0
_MAX_WINDOW_S = 3.5
# An analytic report covers the time since the same process's previous one (JobReporter
# flushes every 0.5 s); the first, or one after a long silence, covers this much.
_ANALYTIC_FIRST_WINDOW_S = 0.5
_ANALYTIC_MAX_WINDOW_S = 5.0
# Reports closer together than this share a window: a process that reports thousands of times
# a second costs ten windows a second of history, not thousands (memory and split time).
_ANALYTIC_MIN_WINDOW_S = 0.1
_STALE_BUSY_S = _DEFAULT_WINDOW_S + 0.5  # a per-process sample's window plus the smoothing
_MPS_SERVER_COMM = "nvidia-cuda-mps"  # comm of nvidia-cuda-mps-server (15 characters)


@dataclass(frozen=True)
class _UtilWindow:
    pid: int
    start_s: float
    end_s: float
    sm_util: float


@dataclass(frozen=True)
class _AnalyticWindow:
    start_s: float
    end_s: float
    flops: float


@dataclass
class _Pending:
    flops: IntervalFlops
    processes: tuple[ProcessInfo, ...]
    since_s: float


class ProcessAttributor:
    """Per-unit state: process-utilisation history and intervals waiting for it."""

    def __init__(
        self,
        hold_s: float = 4.0,
        smooth_s: float = 0.5,
        analytic: bool = True,
        analytic_tolerance: float = 0.5,
    ) -> None:
        if hold_s < smooth_s:
            raise ValueError("hold_s must cover smooth_s: later samples are needed to split")
        if analytic_tolerance < 0:
            raise ValueError("analytic_tolerance must be >= 0")
        self._hold_s = hold_s
        self._smooth_s = smooth_s
        self._analytic = analytic
        self._tolerance = analytic_tolerance
        # Filled from the job socket's thread; drained by the sampling thread (deque appends
        # and pops are atomic).
        self._inbox: deque[tuple[int, float, float]] = deque()
        self._reports: dict[int, deque[_AnalyticWindow]] = {}
        self.stats: dict[str, int] = {
            "analytic": 0, "sm_util": 0, "no_util_data": 0,
            "analytic_not_all_publish": 0, "analytic_not_covered": 0, "analytic_implausible": 0,
        }
        # FLOPs of intervals in which the driver saw two or more processes running kernels
        # (MPS server samples excluded), per unit: while contexts time-slice, activity x the
        # reported SM clock reads high (docs/accuracy.md). Read by the exporter's thread.
        self.timesliced_flops: dict[str, float] = {}
        self._util: dict[str, deque[_UtilWindow]] = {}
        self._last_ts: dict[str, dict[int, float]] = {}
        self._latest: dict[str, float] = {}
        self._pending: dict[str, deque[_Pending]] = {}
        self._comm: dict[int, str] = {}

    def record_analytic(self, pid: int, time_s: float, flops: float) -> None:
        """A process reported ``flops`` of analytic work at ``time_s``. Thread-safe."""
        if self._analytic and flops >= 0:
            self._inbox.append((pid, time_s, flops))

    def _drain_reports(self) -> None:
        if not self._inbox:
            return
        newest = float("-inf")
        while self._inbox:
            pid, t, flops = self._inbox.popleft()
            newest = max(newest, t)
            q = self._reports.setdefault(pid, deque())
            prev = q[-1].end_s if q else None
            if prev is not None and t <= prev:
                # Same instant or out of order: fold into the newest window.
                last = q.pop()
                q.append(_AnalyticWindow(last.start_s, last.end_s, last.flops + flops))
                continue
            if q and t - q[-1].start_s < _ANALYTIC_MIN_WINDOW_S:
                last = q.pop()  # too close to the newest window's start: widen that one
                q.append(_AnalyticWindow(last.start_s, t, last.flops + flops))
                continue
            start = prev if prev is not None and t - prev <= _ANALYTIC_MAX_WINDOW_S else (
                t - _ANALYTIC_FIRST_WINDOW_S
            )
            q.append(_AnalyticWindow(start, t, flops))
            while q[0].end_s < t - _HISTORY_S:
                q.popleft()
        # Processes that stopped reporting a history ago are forgotten (pids are reused).
        for pid in [pid for pid, q in self._reports.items() if q[-1].end_s < newest - _HISTORY_S]:
            del self._reports[pid]

    def add(self, sample: GpuSample, flops: IntervalFlops) -> list[AttributedInterval]:
        """Take one interval; return every interval now settled (this one or held ones)."""
        key = sample.key
        self._drain_reports()
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
        self._drain_reports()
        out: list[AttributedInterval] = []
        for key in list(self._pending):
            out.extend(self._settle(key, now_s=float("inf"), force=True))
        return out

    def held(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def held_from(self) -> float | None:
        """The start of the oldest interval held for per-process samples; None when none is."""
        starts = [q[0].flops.t0_s for q in self._pending.values() if q]
        return min(starts) if starts else None

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
        running: set[int] = set()  # busy in a sample window overlapping the interval itself
        sampled = False
        for w in self._util.get(key, ()):
            overlap = min(hi, w.end_s) - max(lo, w.start_s)
            if overlap > 0:
                sampled = True
                # Under MPS the driver charges the clients' kernels to the MPS server, which does
                # no work of its own: its samples cannot say whose work it was.
                if w.sm_util > 0 and not self._comm.get(w.pid, "").startswith(_MPS_SERVER_COMM):
                    weights[w.pid] = weights.get(w.pid, 0.0) + overlap * w.sm_util
                    if min(t1, w.end_s) > max(t0, w.start_s):
                        running.add(w.pid)
        sliced = len(running) >= 2
        if sliced:
            self.timesliced_flops[key] = self.timesliced_flops.get(key, 0.0) + p.flops.total
        analytic = self._analytic_fractions(p, set(weights), sampled)
        if analytic is not None:
            self.stats["analytic"] += 1
            return AttributedInterval(
                key, t0, t1, _shares(p.flops.flops, analytic, self._comm), "analytic", sliced
            )
        total = sum(weights.values())
        if total <= 0:
            self.stats["no_util_data"] += 1
            shares = _shares(p.flops.flops, {}, self._comm)
            return AttributedInterval(key, t0, t1, shares, "no_util_data")
        self.stats["sm_util"] += 1
        fractions = {pid: w / total for pid, w in weights.items()}
        shares = _shares(p.flops.flops, fractions, self._comm)
        return AttributedInterval(key, t0, t1, shares, "sm_util", sliced)

    def _analytic_fractions(
        self, p: _Pending, busy: set[int], sampled: bool
    ) -> dict[int, float] | None:
        """Shares from the processes' analytic reports, or None when they cannot be trusted.

        Used only when
        - no process that does not report could have done the work: the driver's per-process
          samples cover the interval and show none of them running (an MPS server, which runs
          no work of its own, is left out);
        - every reporting process has reported past the interval's end, or went quiet and the
          driver did not see it running more than ``_STALE_BUSY_S`` after its last report;
        - the reports' sum is within the tolerance of the measured FLOPs: a process that
          under-reports cannot push much of its measured work onto a neighbour, and a wrong
          precision assumption falls back too.
        """
        if not self._analytic:
            return None
        publishers = {proc.pid for proc in p.processes if self._reports.get(proc.pid)}
        if not publishers:
            return None
        others = {
            proc.pid for proc in p.processes
            if proc.pid not in publishers and not proc.comm.startswith(_MPS_SERVER_COMM)
        }
        if others and (not sampled or busy & others):
            self.stats["analytic_not_all_publish"] += 1
            return None
        t0, t1 = p.flops.t0_s, p.flops.t1_s
        amounts: dict[int, float] = {}
        for pid in publishers:
            q = self._reports[pid]
            last = q[-1].end_s
            # An interval is split hold_s after its end, by when a live reporter (flushing every
            # 0.5 s) has reported past it. One that has not went quiet: it reports no work after
            # its last report, which is accepted while the driver's (1 s, widened) samples could
            # still be showing its last kernels; if they show it running later, fall back.
            if last < t1 and pid in busy and t0 > last + _STALE_BUSY_S:
                self.stats["analytic_not_covered"] += 1
                return None
            got = 0.0
            for w in q:
                overlap = min(t1, w.end_s) - max(t0, w.start_s)
                if overlap > 0:
                    got += w.flops * overlap / (w.end_s - w.start_s)
            if got > 0:
                amounts[pid] = got
        total = sum(amounts.values())
        if total <= 0:
            return None
        ratio = p.flops.total / total
        if not 1 / (1 + self._tolerance) <= ratio <= 1 + self._tolerance:
            self.stats["analytic_implausible"] += 1
            return None
        return {pid: v / total for pid, v in amounts.items()}


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
