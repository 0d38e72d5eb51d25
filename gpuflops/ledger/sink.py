"""The daemon's side of the ledger: it commits intervals and job events, in order, and says what
is durable.

The job socket's thread only enqueues (``on_job_event``); analytic ``add`` messages are
coalesced per job into one ``estimate`` record per commit. A writer thread commits queued job
events as one transaction at most every ``ack_window_s`` (group commit), then advances the
*durable ticket*: the job socket holds each reply to a change until the change is durable, so an
acknowledged ``add`` survives a ``kill -9`` (docs/protocol.md, "Durability"). While the ledger
cannot write (a full disk), ``writable()`` is false: the socket then refuses new changes rather
than acknowledging what it could lose, ``problem()`` makes ``/healthz`` fail, and every commit
retries what is queued, in order, until the disk has room again.

Each commit returns what it made durable; the pipeline raises the counters with it (the sink
never touches them). Unmeasured time is recorded too: consecutive sampler gaps of a GPU become
one ``gap`` record (written when the gap ends, and at least every ``gap_flush_s`` while it
lasts), and at start the time since the previous session's coverage ended becomes a node-wide
gap: ``daemon_stopped`` after a clean stop, ``daemon_lost`` otherwise. Interval and ``alive``
records carry ``held_from_s``, the start of the oldest interval not yet written (held for
attribution, or pending), so that gap also covers intervals a ``kill -9`` lost.
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
_TICKETED = frozenset({"register", "add", "claim", "end"})  # changes a reply waits for
# Group commit waits at least this long per record the previous one wrote: however many jobs
# report at once, the writer adds at most ~1,000 job records a second to the ledger.
_RECORD_BUDGET_S = 0.001

Event = tuple[str, str, str, float, dict[str, Any]]  # (kind, job, program, t_s, payload)


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
    events: list[Event] = field(default_factory=list)
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
        ack_window_s: float = 0.005,
    ) -> None:
        self.ledger = ledger
        self._alive_every_s = alive_every_s
        self._gap_flush_s = gap_flush_s
        self._ack_window_s = ack_window_s
        self._gaps: dict[tuple[str, str, str], _GapSpan] = {}  # open spans: (gpu, uuid, reason)
        self._closed_gaps: list[tuple[tuple[str, str, str], _GapSpan]] = []  # to (re)write
        # When an interval, alive or start record last said until when the ledger is complete:
        # an alive record follows when none did for alive_every_s (bounds a crash's gap).
        self._last_mark = clock()
        # 0: one ledger record per sampling interval (kill -9 loses at most that interval).
        # Larger values trade that bound for a smaller ledger (docs/ledger.md, "Size").
        self._commit_every_s = commit_every_s
        self._last_commit = float("-inf")
        self._clock = clock
        self._lock = threading.Lock()  # guards the queue and the tickets
        self._write_lock = threading.Lock()  # one writer at a time: records stay in order
        self._queue = _Queue()
        self._pending: Batch = []
        self._startup: list[Callable[[], object]] = []  # written before anything else
        self._ticket = 0  # the newest change handed to the sink
        self._durable = 0  # every change up to this ticket is committed
        self._uncounted: list[CommittedEstimate] = []  # committed, not yet given to the pipeline
        self._rejected: list[str] = []
        self._listeners: list[Callable[[], None]] = []
        self._failing_since: float | None = None
        self._last_error = ""
        self.write_errors = 0
        self.records = ledger.totals().records if ledger is not None else 0
        # Where the previous session's record ends, read before this session writes anything.
        self._previous = ledger.last_activity() if ledger is not None else None
        self._warned = False
        self._work = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_drain_records = 0

    # ---------------------------------------------------------- durability (socket thread)

    def ticket(self) -> int:
        """The ticket of the newest change handed to the sink."""
        return self._ticket

    def durable(self) -> int:
        """Every change with a ticket up to this one is committed."""
        return self._durable

    def writable(self) -> bool:
        """False while the ledger fails to write (a full disk, a lock): refuse new changes."""
        return self._failing_since is None

    def on_durable(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the writing thread) whenever the durable ticket advances."""
        self._listeners = [*self._listeners, listener]

    def problem(self) -> str | None:
        """Why the ledger is unhealthy, for /healthz; None when it writes."""
        since = self._failing_since
        if since is None:
            return None
        return (f"ledger cannot write for {self._clock() - since:.0f} s ({self._last_error}); "
                f"{len(self._pending)} intervals and {len(self._queue.events)} events wait")

    def start(self) -> None:
        """Start the writer thread that commits job events as they come (group commit)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpuflops-ledger", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._work.wait(1.0)  # also retries, once a second, while the disk is full
            if self._stopping.wait(max(self._ack_window_s,
                                       self._last_drain_records * _RECORD_BUDGET_S)):
                return
            self._work.clear()
            try:
                self._drain()
            except Exception:  # never let the writer die: the sampling thread's commits go on
                log.exception("ledger writer failed; will retry")

    # ---------------------------------------------------------- session and gaps

    def start_session(self, payload: Mapping[str, Any], gpus: list[tuple[str, str]]) -> None:
        """Record this daemon's start, and the unmeasured time since the previous session.

        Both are written before any other record; if the ledger cannot write now (locked,
        full) they wait at the head of the queue and every commit retries them."""
        if self.ledger is None:
            return
        ledger = self.ledger
        now = self._clock()
        last, self._previous = self._previous, None
        if last is not None and now > last.t_s:
            reason = "daemon_stopped" if last.clean_stop else "daemon_lost"
            self._startup.append(lambda: ledger.append_gap(last.t_s, now, reason, [(NODE, "")]))
        start = {**payload, "gpus": [list(g) for g in gpus]}
        self._startup.append(lambda: ledger.append_session("start", now, start))
        with self._write_lock:
            self._write_startup()

    def _write_startup(self) -> bool:
        """Write the queued start records (write lock held); False if they must wait."""
        while self._startup:
            try:
                self._startup[0]()
            except (LedgerError, OSError) as e:
                self._write_failed(e)
                return False
            self._startup.pop(0)
            self._wrote(1)
        return True

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
        self._wrote(1)
        return True

    # ---------------------------------------------------------- socket thread

    def on_job_event(self, event: RegistryEvent) -> None:
        """Registry listener: enqueue only (runs on the socket server's thread)."""
        kind = event.kind
        key = (event.job_id, event.program_id)
        with self._lock:
            if kind in _TICKETED:
                self._ticket += 1
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
            elif kind == "refused":  # coalesced: a flood of refused adds is one record a commit
                ref = self._queue.refusals.setdefault((*key, event.data["reason"]), _Refusals())
                ref.count += 1
                ref.flops += float(event.data.get("flops", 0.0))
                ref.tokens += float(event.data.get("tokens", 0.0))
                ref.t0 = min(ref.t0, event.time_s)
                ref.t1 = max(ref.t1, event.time_s)
                ref.uids.add(event.peer.uid)
                ref.detail, ref.limit = str(event.data.get("detail", "")), event.data.get("limit")
            elif kind in ("register", "claim", "end"):
                data = dict(event.data)
                # Registration metadata goes to the top level of the ledger payload, where the
                # reconciliation, threshold and report code read it (docs/ledger.md).
                payload = {**dict(data.pop("metadata", None) or {}), **data}
                payload["peer"] = {"pid": event.peer.pid, "uid": event.peer.uid,
                                   "gid": event.peer.gid}
                if kind == "end":
                    self._move_estimate(key)
                self._queue.events.append((kind, event.job_id, event.program_id, event.time_s,
                                           payload))
            else:
                return
        self._work.set()

    def _move_estimate(self, key: tuple[str, str]) -> None:
        est = self._queue.estimates.pop(key, None)
        if est is not None and est.adds:
            self._queue.events.append(("estimate", key[0], key[1], est.t1, _estimate_payload(est)))

    def _take_events(self) -> tuple[list[Event], int]:
        """Everything queued, in order, and the ticket it covers (the lock held)."""
        for key in list(self._queue.estimates):
            self._move_estimate(key)
        for (job, program, reason), ref in self._queue.refusals.items():
            self._queue.events.append(("refused", job, program, ref.t1, {
                "op": "add", "reason": reason, "count": ref.count, "flops": ref.flops,
                "tokens": ref.tokens, "window_t0_s": ref.t0, "window_t1_s": ref.t1,
                "uids": sorted(ref.uids), "detail": ref.detail, "limit": ref.limit}))
        self._queue.refusals.clear()
        events, self._queue.events = self._queue.events, []
        return events, self._ticket

    def _drain(self) -> bool:
        """Commit every queued job event as one transaction; True when nothing is left."""
        with self._write_lock:
            if not self._write_startup():
                return False
            with self._lock:
                events, ticket = self._take_events()
            estimates: list[CommittedEstimate] = []
            if events and self.ledger is not None:
                written = 0
                try:
                    with self.ledger.batch():
                        for kind, job, program, t, payload in events:
                            try:
                                self.ledger.append_job_event(kind, job, program, payload, t)
                            except ValueError as e:
                                log.error("ledger refused %s event for job %s: %s", kind, job, e)
                                self._rejected.append("ledger_bad_event")
                                continue
                            written += 1
                            if kind == "estimate":
                                estimates.append(_committed(job, program, payload))
                except (LedgerError, OSError) as e:
                    self._write_failed(e)
                    with self._lock:  # retried next time, all of it and in order
                        self._queue.events[:0] = events
                    return False
                self._wrote(written)
                self._last_drain_records = written
            elif events:
                estimates = [_committed(j, p, pl) for k, j, p, _t, pl in events if k == "estimate"]
            with self._lock:
                self._uncounted.extend(estimates)
                advanced = ticket > self._durable
                self._durable = max(self._durable, ticket)
        if advanced:
            for listener in self._listeners:
                listener()
        return True

    # ---------------------------------------------------------- sampling thread

    def commit(self, batch: Batch, *, force: bool = False,
               held_from_s: float | None = None) -> Committed:
        """Write job events, then intervals; return what is now durable, for the counters.

        ``held_from_s``: the start of the oldest interval the attribution still holds."""
        now = self._clock()
        if self.ledger is not None and not force and now - self._last_commit < self._commit_every_s:
            self._pending.extend(batch)
            return self._committed(((),))
        self._last_commit = now
        self._drain()
        self._pending.extend(batch)
        with self._write_lock:
            if self.ledger is not None and not self._write_startup():
                return self._committed(())
            self._flush_gaps(force)
            if self.ledger is not None and now - self._last_mark >= self._alive_every_s:
                # Written before the pending intervals: they are not in the ledger yet.
                pending = min([math.inf if held_from_s is None else held_from_s]
                              + [p[0] for p in self._pending])
                self._write_session("alive", now, None if math.isinf(pending) else pending)
            if not self._pending:
                return self._committed(((),))
            if self.ledger is None:
                counted = tuple(tuple(rows) for _t0, _t1, rows in self._pending)
                self._pending.clear()
                return self._committed(counted)
            return self._write_intervals(now, held_from_s)

    def _write_intervals(self, now: float, held_from: float | None) -> Committed:
        assert self.ledger is not None
        t0 = min(p[0] for p in self._pending)
        t1 = max(p[1] for p in self._pending)
        rows = [r for p in self._pending for r in p[2]]
        try:
            seq = self.ledger.append_interval(t0, t1, rows, held_from_s=held_from)
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            dropped: Batch = []
            if len(self._pending) > _MAX_PENDING_INTERVALS:
                # Keep metering even when the disk is gone: count, but say it is not durable.
                dropped = self._pending[: -_MAX_PENDING_INTERVALS]
                del self._pending[: -_MAX_PENDING_INTERVALS]
            return self._committed(tuple(tuple(rs) for _a, _b, rs in dropped))
        except ValueError as e:  # a bad row: never write it, keep the rest for the next commit
            log.error("ledger refused interval rows: %s", e)
            self._rejected.append("ledger_bad_row")
            good = [r for r in rows if math.isfinite(r.flops) and r.flops >= 0]
            self._pending = [(t0, t1, good)] if good else []
            return self._committed(())
        if seq is not None:
            self._wrote(1)
            self._last_mark = now
        else:
            self._wrote(0)
        self._pending.clear()
        return self._committed((tuple(rows),))

    def _committed(self, rows: tuple[tuple[FlopsRow, ...], ...]) -> Committed:
        with self._lock:
            estimates, self._uncounted = self._uncounted, []
            rejected, self._rejected = self._rejected, []
        return Committed(rows, tuple(estimates), tuple(rejected))

    def _write_session(self, event: str, t_s: float, held_from: float | None = None) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.append_session(
                event, t_s, {} if held_from is None else {"held_from_s": held_from})
        except (LedgerError, OSError) as e:
            self._write_failed(e)
            return
        self._wrote(1)
        self._last_mark = t_s

    def _wrote(self, records: int) -> None:
        self.records += records
        if self._failing_since is not None:
            log.warning("ledger writes again after %.0f s; what waited is committed in order",
                        self._clock() - self._failing_since)
            self._failing_since = None
            self._warned = False

    def _write_failed(self, e: Exception) -> None:
        self.write_errors += 1
        self._last_error = str(e)
        if self._failing_since is None:
            self._failing_since = self._clock()
        if not self._warned:
            self._warned = True
            log.error("ledger write failed; the job socket refuses changes and /healthz fails "
                      "until it writes again (retried every commit): %s", e)
        else:
            log.debug("ledger write failed: %s", e)

    @property
    def pending_intervals(self) -> int:
        return len(self._pending)

    def close(self) -> Committed:
        """Stop the writer, commit what is still pending, record the clean stop, then close.

        Returns that last commit (nothing without a ledger)."""
        self._stopping.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None
        if self.ledger is None:
            return self._committed(())
        done = self.commit([], force=True)
        with self._write_lock:
            if not self._startup and not self._pending and not self._queue.events:
                self._write_session("stop", self._clock())  # only a complete stop is clean
        self.ledger.close()
        return done


def _committed(job: str, program: str, payload: Mapping[str, Any]) -> CommittedEstimate:
    return CommittedEstimate(job, program, payload["analytic_flops"], payload["tokens"],
                             payload["recompute_flops"])


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
