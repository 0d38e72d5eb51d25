"""Ships a node's ledger to the central store, from a background thread.

The local SQLite ledger is the spool: the sampling thread never waits for the network, and
nothing is kept in memory beyond one transaction's records (``max_records`` raw records). Each
round resumes from the central head of this ledger (so an outage, a kill -9 of either side or
a lost commit acknowledgement all end the same way), checks that the raw record the head
anchors is still the local one, replays the raw records after it (checking every link and
hash), and inserts the resulting signed rollups in one transaction.

A central head that anchors a raw record the local chain does not have is a fork: the local
history was rewritten after it was shipped, or the state directory was restored from an older
copy. The shipper then reports it (``gpuflops.forks``), fences the ledger and ships nothing
more for it (fails closed); ``gpuflops_central_forks_total`` and the log say so.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gpuflops.ledger.central import CentralError, CentralStore, Registration
from gpuflops.ledger.records import JobTotals
from gpuflops.ledger.rollup import (
    RawChainError,
    RawRecord,
    Replica,
    RollupBuilder,
    check_raw,
    record_time,
    rollup_signing_message,
)
from gpuflops.ledger.signing import SigningKey

log = logging.getLogger(__name__)


class RawChainReader:
    """Read-only access to a node's SQLite chain (its own connection, for the shipper thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._con: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection | None:
        if self._con is None:
            if not self.path.exists():
                return None
            # mode=rw, not ro: when this is the last connection to close (the final round runs
            # after the daemon's writer closed), SQLite then checkpoints and removes the WAL as
            # the writer would have. query_only refuses every write through this connection.
            self._con = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True,
                                        isolation_level=None, check_same_thread=False,
                                        timeout=10.0)
            self._con.execute("PRAGMA query_only = ON")
        return self._con

    def ledger_id(self) -> str | None:
        """The genesis record's ledger id; None while the daemon has not created it yet."""
        db = self._db()
        if db is None:
            return None
        try:
            row = db.execute("SELECT content FROM records WHERE seq = 1 AND kind = 'genesis'"
                             ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return None if row is None else str(json.loads(row[0])["ledger_id"])

    def head_seq(self) -> int:
        db = self._db()
        row = None if db is None else db.execute("SELECT max(seq) FROM records").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def record(self, seq: int) -> RawRecord | None:
        db = self._db()
        row = None if db is None else db.execute(
            "SELECT seq, kind, content, prev_hash, hash FROM records WHERE seq = ?",
            (seq,)).fetchone()
        return None if row is None else RawRecord(*row)

    def after(self, seq: int, limit: int) -> list[RawRecord]:
        db = self._db()
        if db is None:
            return []
        return [RawRecord(*r) for r in db.execute(
            "SELECT seq, kind, content, prev_hash, hash FROM records WHERE seq > ?"
            " ORDER BY seq LIMIT ?", (seq, limit))]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


@dataclass(frozen=True)
class ShipStatus:
    """What the exporter shows of shipping, replaced whole after every round."""

    enabled: bool = True
    ledger_id: str | None = None
    local_head_seq: int = 0
    central_raw_seq: int = 0
    oldest_unshipped_t_s: float | None = None
    rounds: int = 0
    shipped_records: int = 0
    shipped_rollups: int = 0
    errors: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))
    forks: int = 0
    fenced: str | None = None
    last_success_s: float | None = None

    @property
    def backlog_records(self) -> int:
        return max(0, self.local_head_seq - self.central_raw_seq)

    def lag_s(self, now_s: float) -> float:
        """Age of the oldest local record not yet in the central store (0 when caught up)."""
        if self.oldest_unshipped_t_s is None or self.backlog_records == 0:
            return 0.0
        return max(0.0, now_s - self.oldest_unshipped_t_s)


class _Fenced(Exception):
    """Shipping of this ledger must stop; carries the reason."""


@dataclass
class _State:
    ledger_id: str
    builder: RollupBuilder


class Shipper:
    """One ledger's shipping: ``run_once`` does a round; ``start``/``stop`` run it periodically."""

    def __init__(self, store: CentralStore, reader: RawChainReader, key: SigningKey, *,
                 node: str, cluster: str, period_s: float = 60.0, max_records: int = 20000,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.reader = reader
        self.key = key
        self.node, self.cluster = node, cluster
        self.period_s = period_s
        self._max_records = max_records
        self._clock = clock
        self._state: _State | None = None
        self._status = ShipStatus()
        self._errors: dict[str, int] = {}
        self._pending_fork: tuple[str, int, str, str, str] | None = None
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- status -------------------------------------------------------------------------------

    def status(self) -> ShipStatus:
        return self._status

    def _publish(self, **changes: Any) -> None:
        base = vars(self._status) | changes | {"errors": MappingProxyType(dict(self._errors))}
        self._status = ShipStatus(**base)

    def _error(self, kind: str, message: str) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("central shipping (%s): %s; retrying every %.0f s", kind, message,
                        self.period_s)
        else:
            log.debug("central shipping (%s): %s", kind, message)

    # -- one round ------------------------------------------------------------------------------

    def run_once(self, budget_s: float | None = None) -> int:
        """Ship what the local chain has beyond the central head, for at most ``budget_s``
        (after the first transaction); returns the raw records shipped."""
        try:
            return self._round(budget_s)
        finally:
            # Never hold the ledger open between rounds: the daemon's writer, closing last,
            # then checkpoints and removes the WAL, leaving one self-contained file.
            self.reader.close()

    def _round(self, budget_s: float | None) -> int:
        deadline = None if budget_s is None else self._clock() + budget_s
        self._publish(rounds=self._status.rounds + 1, local_head_seq=self.reader.head_seq())
        if self._status.fenced is not None:
            self._report_pending_fork()
            return 0
        shipped = 0
        try:
            state = self._state or self._resync()
            if state is None:
                return 0
            while deadline is None or shipped == 0 or self._clock() < deadline:
                b = state.builder
                records = self.reader.after(b.raw_seq, self._max_records)
                if not records:
                    break
                try:
                    check_raw(records, b.raw_seq, b.raw_hash)
                except RawChainError as exc:
                    good = [r for r in records if r.seq < exc.seq]
                    if good:
                        shipped += self._ship(state, good)
                    raise _Fenced(f"local chain fails its own check at {exc}; run `gpuflops "
                                  "verify` on this node") from None
                shipped += self._ship(state, records)
                if len(records) < self._max_records:
                    break
            self._publish(last_success_s=self._clock(), local_head_seq=self.reader.head_seq())
        except CentralError as exc:
            self._state = None  # resume from whatever the central store has
            self._error(exc.kind, str(exc))
        except (sqlite3.Error, OSError) as exc:
            self._state = None
            self.reader.close()
            self._error("local", f"cannot read the local ledger: {exc}")
        except _Fenced as exc:
            self._state = None
            self._errors["fenced"] = self._errors.get("fenced", 0) + 1
            log.error("central shipping STOPPED for this ledger: %s", exc)
            self._publish(fenced=str(exc))
        except (KeyError, TypeError, ValueError) as exc:  # a record this code cannot roll up
            self._state = None
            self._error("local", f"cannot roll up a local record: {exc!r}")
        self._note_oldest_unshipped()
        return shipped

    def _resync(self) -> _State | None:
        ledger_id = self.reader.ledger_id()
        if ledger_id is None:
            return None  # the daemon has not created its ledger yet
        reg = self.store.register(Registration(ledger_id, self.node, self.cluster,
                                               self.key.public_key))
        if reg.public_key != self.key.public_key:
            raise _Fenced(f"ledger {ledger_id} is registered with public key "
                          f"{reg.public_key.hex()}, this node's key ({self.key.path}) is "
                          f"{self.key.public_key_hex}: restore the node key (docs/fleet.md)")
        if (reg.node, reg.cluster) != (self.node, self.cluster) and "identity" not in self._warned:
            self._warned.add("identity")
            log.warning("ledger %s is registered as node %r cluster %r; keeping those names, "
                        "not %r %r", ledger_id, reg.node, reg.cluster, self.node, self.cluster)
        head = self.store.head(ledger_id)
        if head is None:
            raise CentralError("query", f"ledger {ledger_id} has no head row")
        if head.failed is not None:
            raise _Fenced(f"the central store fenced ledger {ledger_id}: {head.failed}")
        if head.raw_seq > 0:
            local = self.reader.record(head.raw_seq)
            if local is None or local.hash != head.raw_hash:
                self._fork(ledger_id, head.raw_seq, head.raw_hash,
                           "" if local is None else local.hash)
        seed = dict(JobTotals.from_row(r) for r in self.store.job_rows(ledger_id))
        builder = RollupBuilder(
            ledger_id, reg.node, reg.cluster, head_seq=head.seq, head_hash=head.hash,
            raw_seq=head.raw_seq, raw_hash=head.raw_hash, replica=Replica(seed),
            period_s=1.5 * self.period_s, max_records=self._max_records)
        self._state = _State(ledger_id, builder)
        self._publish(ledger_id=ledger_id, central_raw_seq=head.raw_seq)
        return self._state

    def _fork(self, ledger_id: str, raw_seq: int, central_hash: str, local_hash: str) -> None:
        local_end = self.reader.head_seq()
        detail = (f"node {self.node}: the central store anchors raw record {raw_seq} with hash "
                  f"{central_hash}, the local chain has "
                  + (f"hash {local_hash} there" if local_hash else
                     f"no such record (it ends at {local_end})")
                  + ": local history changed after it was shipped")
        self._pending_fork = (ledger_id, raw_seq, central_hash, local_hash, detail)
        self._publish(forks=self._status.forks + 1)
        self._report_pending_fork()
        raise _Fenced(detail)

    def _report_pending_fork(self) -> None:
        if self._pending_fork is None:
            return
        try:
            self.store.report_fork(*self._pending_fork)
        except CentralError as exc:
            self._error(exc.kind, f"fork not yet recorded centrally: {exc}")
            return
        self._pending_fork = None

    def _ship(self, state: _State, records: list[RawRecord]) -> int:
        rollups = state.builder.build(records)
        rows = [(r.seq, r.content, r.prev_hash, r.hash,
                 self.key.sign(rollup_signing_message(r.hash))) for r in rollups]
        self.store.insert_records(state.ledger_id, rows)
        st = self._status
        self._publish(shipped_records=st.shipped_records + len(records),
                      shipped_rollups=st.shipped_rollups + len(rollups),
                      central_raw_seq=state.builder.raw_seq)
        return len(records)

    def _note_oldest_unshipped(self) -> None:
        try:
            rec = self.reader.record(self._status.central_raw_seq + 1)
        except sqlite3.Error:
            return
        t = None if rec is None else record_time(rec.kind, json.loads(rec.content))
        self._publish(oldest_unshipped_t_s=t, local_head_seq=self.reader.head_seq())

    # -- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="central-ship", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # never let shipping take the daemon down
                log.exception("central shipping round failed")
            self._stop.wait(self.period_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ship what is left (one bounded round), then stop; the caller's ledger is final."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("central shipping did not finish within %.0f s; the rest ships at "
                            "the next start", timeout_s)
                return
        try:
            self.run_once(budget_s=timeout_s)
        except Exception:
            log.exception("final central shipping round failed")
        self.store.close()
        self.reader.close()
