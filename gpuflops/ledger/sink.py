"""The daemon's side of the ledger: one thread commits intervals and job events, in order.

The job socket's thread only enqueues (``on_job_event``); analytic ``add`` messages are
coalesced per job into one ``estimate`` record per commit, so a client sending thousands of
messages a second does not turn into thousands of ledger records. Each commit returns what it
made durable; the pipeline raises the counters with it (the sink never touches them).

Unmeasured time is recorded too: consecutive sampler gaps of a GPU become one ``gap`` record
(written when the gap ends, and at least every ``gap_flush_s`` while it lasts), and at start
the time since the previous session's last record becomes a node-wide gap: ``daemon_stopped``
after a clean stop, ``daemon_lost`` otherwise. While nothing else is written an ``alive``
session record every ``alive_every_s`` bounds how far that second kind can overstate.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuflops.jobs.records import RegistryEvent
from gpuflops.ledger.records import NODE, LedgerError
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow
from gpuflops.pipeline.pipeline import Batch, Committed, CommittedEstimate

log = logging.getLogger(__name__)

_MAX_PENDING_INTERVALS = 36000  # an hour at 10 Hz; beyond it rows are counted, not persisted
_GAP_JOIN_S = 1.0  # a gap interval starting this close to the open span's end extends it


@dataclass
class _GapSpan:
    t0: float
    t1: float
    extended: bool = True  # since the last commit


@dataclass
class _Estimate:
    flops: float = 0.0
    tokens: float = 0.0
    recompute: float = 0.0
    t0: float = float("inf")
    t1: float = float("-inf")
    adds: int = 0
    clients: dict[str, int] = field(default_factory=dict)  # reporter -> highest seq applied


@dataclass
class _Refusals:
    """Refused adds of one job for one reason since the last commit, as one record."""

    count: int = 0
    flops: float = 0.0
    tokens: float = 0.0
    t0: float = float("inf")
    t1: float = float("-inf")
    uids: set[int] = field(default_factory=set)
    detail: str = ""
    limit: float | None = None


@dataclass
class _Queue:
    events: list[tuple[str, str, str, float, dict[str, Any]]] = field(default_factory=list)
    estimates: dict[tuple[str, str], _Estimate] = field(default_factory=dict)
    refusals: dict[tuple[str, str, str], _Refusals] = field(default_factory=dict)


class LedgerSink:
    """Commits what the pipeline and the job socket produce; returns what became durable."""

    def __init__(
        self,
        ledger: Ledger | None,
        *,
        clock: Callable[[], float] = time.time,
        commit_every_s: float = 0.0,
        alive_every_s: float = 60.0,
        gap_flush_s: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self._alive_every_s = alive_every_s
        self._gap_flush_s = gap_flush_s
        self._gaps: dict[tuple[str, str, str], _GapSpan] = {}  # open spans: (gpu, uuid, reason)
        self._closed_gaps: list[tuple[tuple[str, str, str], _GapSpan]] = []  # to (re)write
        self._last_write = clock()
        # 0: one ledger record per sampling interval (kill -9 loses at most that interval).
        # Larger values trade that bound for a smaller ledger (docs/ledger.md, "Size").
        self._commit_every_s = commit_every_s
        self._last_commit = float("-inf")
        self._clock = clock
        self._lock = threading.Lock()
        self._queue = _Queue()
        self._pending: Batch = []
        self.write_errors = 0
        self.records = ledger.totals().records if ledger is not None else 0
        self._warned = False

    def start_session(self, payload: Mapping[str, Any], gpus: list[tuple[str, str]]) -> None:
        """Record this daemon's start, and the unmeasured time since the previous session."""
        if self.ledger is None:
            return
        now = self._clock()
        try:
            last = self.ledger.last_activity()
            if last is not None and now > last.t_s:
                reason = "daemon_stopped" if last.clean_stop else "daemon_lost"
                self.ledger.append_gap(last.t_s, now, reason, [(NODE, "")])
                self.records += 1
            self.ledger.append_session("start", now, {**payload, "gpus": [list(g) for g in gpus]})
            self.records += 1
            self._last_write = now
        except (LedgerError, OSError) as e:
            self._write_failed(e)

    def on_gap(self, gpu: str, uuid: str, t0_s: float, t1_s: float, reason: str) -> None:
        """A sampled interval of ``gpu`` could not be measured (sampling thread)."""
        span = self._gaps.get((gpu, uuid, reason))
        if span is not None and t0_s <= span.t1 + _GAP_JOIN_S:
            span.t1 = max(span.t1, t1_s)
            span.extended = True
            return
        if span is not None:
            self._closed_gaps.append(((gpu, uuid, reason), span))
        self._gaps[(gpu, uuid, reason)] = _GapSpan(t0_s, t1_s)

    def _flush_gaps(self, force: bool) -> None:
        """Write gap spans that ended (not extended since the last commit) or grew long."""
        self._closed_gaps = [(k, sp) for k, sp in self._closed_gaps if not self._write_gap(k, sp)]
        for key, span in list(self._gaps.items()):
            if force or not span.extended or span.t1 - span.t0 >= self._gap_flush_s:
                if self._write_gap(key, span):
                    del self._gaps[key]
            else:
                span.extended = False

    def _write_gap(self, key: tuple[str, str, str], span: _GapSpan) -> bool:
        if self.ledger is None:
            return True
        gpu, uuid, reason = key
        try:
            self.ledger.append_gap(span.t0, span.t1, reason, [(gpu, uuid)])
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            return False
        except ValueError as e:
            log.error("ledger refused a gap of GPU %s: %s", gpu, e)
            return True
        self.records += 1
        self._last_write = self._clock()
        return True

    # ---------------------------------------------------------- socket thread

    def on_job_event(self, event: RegistryEvent) -> None:
        """Registry listener: enqueue only (runs on the socket server's thread)."""
        kind = event.kind
        key = (event.job_id, event.program_id)
        with self._lock:
            if kind == "add":
                est = self._queue.estimates.setdefault(key, _Estimate())
                est.flops += float(event.data.get("flops", 0.0))
                est.tokens += float(event.data.get("tokens", 0.0))
                est.recompute += float(event.data.get("recompute_flops", 0.0))
                est.adds += int(event.data.get("adds", 1))
                est.t0 = min(est.t0, event.time_s)
                est.t1 = max(est.t1, event.time_s)
                client, seq = event.data.get("client"), event.data.get("seq")
                if client is not None and seq is not None:
                    est.clients[client] = max(seq, est.clients.get(client, seq))
                return
            if kind == "refused":  # coalesced: a flood of refused adds is one record a commit
                ref = self._queue.refusals.setdefault((*key, event.data["reason"]), _Refusals())
                ref.count += 1
                ref.flops += float(event.data.get("flops", 0.0))
                ref.tokens += float(event.data.get("tokens", 0.0))
                ref.t0 = min(ref.t0, event.time_s)
                ref.t1 = max(ref.t1, event.time_s)
                ref.uids.add(event.peer.uid)
                ref.detail, ref.limit = str(event.data.get("detail", "")), event.data.get("limit")
                return
            if kind not in ("register", "claim", "end"):
                return
            data = dict(event.data)
            # Registration metadata goes to the top level of the ledger payload, where the
            # reconciliation, threshold and report code read it (docs/ledger.md).
            payload = {**dict(data.pop("metadata", None) or {}), **data}
            payload["peer"] = {"pid": event.peer.pid, "uid": event.peer.uid, "gid": event.peer.gid}
            if kind == "end":
                self._move_estimate(key)
            self._queue.events.append((kind, event.job_id, event.program_id, event.time_s, payload))

    def _move_estimate(self, key: tuple[str, str]) -> None:
        est = self._queue.estimates.pop(key, None)
        if est is not None and est.adds:
            self._queue.events.append(("estimate", key[0], key[1], est.t1, _estimate_payload(est)))

    # ---------------------------------------------------------- sampling thread

    def commit(self, batch: Batch, *, force: bool = False) -> Committed:
        """Write job events, then intervals; return what is now durable, for the counters."""
        now = self._clock()
        if self.ledger is not None and not force and now - self._last_commit < self._commit_every_s:
            self._pending.extend(batch)
            return Committed()
        self._last_commit = now
        with self._lock:
            for key in list(self._queue.estimates):
                self._move_estimate(key)
            for (job, program, reason), ref in self._queue.refusals.items():
                self._queue.events.append(("refused", job, program, ref.t1, {
                    "op": "add", "reason": reason, "count": ref.count, "flops": ref.flops,
                    "tokens": ref.tokens, "window_t0_s": ref.t0, "window_t1_s": ref.t1,
                    "uids": sorted(ref.uids), "detail": ref.detail, "limit": ref.limit}))
            self._queue.refusals.clear()
            events, self._queue.events = self._queue.events, []
        estimates: list[CommittedEstimate] = []
        refused: list[str] = []
        for i, (kind, job, program, t, payload) in enumerate(events):
            written = self._write_event(kind, job, program, t, payload, refused)
            if written is None:  # the ledger cannot write: retry all of it next time, in order
                with self._lock:
                    self._queue.events[:0] = events[i:]
                break
            if written and kind == "estimate":
                estimates.append(CommittedEstimate(
                    job, program, payload["analytic_flops"], payload["tokens"],
                    payload["recompute_flops"],
                ))

        def done(rows: tuple[tuple[FlopsRow, ...], ...] = ((),)) -> Committed:
            return Committed(rows, tuple(estimates), tuple(refused))

        self._flush_gaps(force)
        if self.ledger is not None and now - self._last_write >= self._alive_every_s:
            self._write_session("alive", now)
        self._pending.extend(batch)
        if not self._pending:
            return done()
        if self.ledger is None:
            counted = tuple(tuple(rows) for _t0, _t1, rows in self._pending)
            self._pending.clear()
            return done(counted)
        t0 = min(p[0] for p in self._pending)
        t1 = max(p[1] for p in self._pending)
        rows = [r for p in self._pending for r in p[2]]
        try:
            seq = self.ledger.append_interval(t0, t1, rows)
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            dropped: Batch = []
            if len(self._pending) > _MAX_PENDING_INTERVALS:
                # Keep metering even when the disk is gone: count, but say it is not durable.
                dropped = self._pending[: -_MAX_PENDING_INTERVALS]
                del self._pending[: -_MAX_PENDING_INTERVALS]
            return done(tuple(tuple(rs) for _a, _b, rs in dropped))
        except ValueError as e:  # a bad row: never write it, keep the rest for the next commit
            log.error("ledger refused interval rows: %s", e)
            refused.append("ledger_bad_row")
            good = [r for r in rows if math.isfinite(r.flops) and r.flops >= 0]
            self._pending = [(t0, t1, good)] if good else []
            return done(())
        if seq is not None:
            self.records += 1
            self._last_write = now
        self._pending.clear()
        return done((tuple(rows),))

    def _write_event(self, kind: str, job: str, program: str, t: float, payload: dict[str, Any],
                     refused: list[str]) -> bool | None:
        """True: written; False: refused by the ledger (a bad value); None: write failed."""
        if self.ledger is None:
            return True
        try:
            self.ledger.append_job_event(kind, job, program, payload, t)
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            return None
        except ValueError as e:
            log.error("ledger refused %s event for job %s: %s", kind, job, e)
            refused.append("ledger_bad_event")
            return False
        self.records += 1
        self._last_write = self._clock()
        return True

    def _write_session(self, event: str, t_s: float) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.append_session(event, t_s, {})
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            return
        self.records += 1
        self._last_write = t_s

    def _write_failed(self, e: Exception) -> None:
        self.write_errors += 1
        if not self._warned:
            self._warned = True
            log.warning("ledger write failed (will retry every interval): %s", e)
        else:
            log.debug("ledger write failed: %s", e)

    @property
    def pending_intervals(self) -> int:
        return len(self._pending)

    def close(self) -> Committed:
        """Commit what is still pending, record the clean stop, then close the ledger.

        Returns that last commit (nothing without a ledger).
        """
        if self.ledger is None:
            return Committed(rows=())
        done = self.commit([], force=True)
        self._write_session("stop", self._clock())
        self.ledger.close()
        return done


def _estimate_payload(est: _Estimate) -> dict[str, Any]:
    return {
        "clients": dict(sorted(est.clients.items())),
        "analytic_flops": est.flops,
        "tokens": est.tokens,
        "recompute_flops": est.recompute,
        "adds": est.adds,
        "window_t0_s": est.t0,
        "window_t1_s": est.t1,
    }
