"""Append-only SQLite ledger of measured FLOPs and job events, chained by SHA-256 hashes.

Every record (one per sampling interval with work, one per job event) stores the hash of the
record before it; ``hash = sha256(prev_hash || canonical JSON of the content)`` and the content
carries its own sequence number, so editing, deleting or reordering a record breaks the chain.
The newest sequence number and hash are also kept in ``chain_head``, written in the same
transaction, so deleting the last records is detected as well (unless ``chain_head`` is
rewritten too: anchor the head hash outside the machine, see docs/ledger.md).

Besides intervals and job events the chain holds ``gap`` records (time a GPU, or the whole
node, was not measured, and why) and ``session`` records (the daemon started, stopped, or was
alive while idle), so an auditor can tell unmeasured time from idle time.

Derived tables (``gpu_totals``, ``job_totals``, ``job_intervals``, ``job_events``, ``gaps``) are
updated in the same transaction as the record; ``verify`` recomputes them from the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpuflops.jobs.records import KnownJob, ProgramOwner
from gpuflops.ledger import owners, queries
from gpuflops.ledger.chain import (
    GENESIS_PREV_HASH,
    append_record,
    canonical_json,
    rebuild_derived,
    record_hash,
    verify_path,
)
from gpuflops.ledger.records import (
    JOB_EVENT_KINDS,
    SESSION_EVENTS,
    Gap,
    JobEventKind,
    JobEventRecord,
    JobKey,
    JobTotals,
    LastActivity,
    LedgerCorruptError,
    LedgerError,
    LedgerTotals,
    LedgerVersionError,
    LedgerWriteError,
    Synchronous,
    VerifyResult,
)
from gpuflops.ledger.schema import MIGRATIONS, SCHEMA_VERSION, apply_event, apply_gap, apply_interval
from gpuflops.model import FlopsRow


def _finite(value: float, what: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return v


class Ledger:
    """The persistent, hash-chained ledger; thread-safe (one lock, one connection)."""

    def __init__(self, path: Path, con: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self.path = path
        self._con = con
        self._clock = clock
        self._lock = threading.RLock()  # re-entered by appends inside batch()
        self._batch = False
        row = con.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
        self._head_seq: int = row[0]
        self._head_hash: str = row[1]

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], float],
             synchronous: Synchronous = "FULL", readonly: bool = False) -> Ledger:
        """Open (creating and migrating as needed) the ledger at ``path``.

        WAL with ``synchronous=FULL`` fsyncs the WAL at every commit: a ``kill -9`` loses
        only the uncommitted interval, and so does a power cut. ``NORMAL`` also survives
        ``kill -9`` (the WAL is in the page cache) but may lose the last commits on power loss.
        Raises LedgerCorruptError / LedgerVersionError and never rewrites a bad file.
        """
        path = Path(path)
        if readonly and not path.exists():
            raise LedgerError(path, "no ledger here")
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            target = f"file:{path}?mode=ro" if readonly else str(path)
            con = sqlite3.connect(target, uri=readonly, isolation_level=None,
                                  check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise LedgerCorruptError(path, f"cannot open: {exc}") from exc
        try:
            if readonly:
                # Archived ledgers of older schemas stay readable as they are (evidence is not
                # migrated); tables a version added read as empty.
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if not 1 <= version <= SCHEMA_VERSION:
                    raise LedgerVersionError(
                        path, f"schema version {version}, this gpuflops reads 1 to {SCHEMA_VERSION}")
            else:
                con.execute("PRAGMA journal_mode=WAL").fetchone()
                con.execute(f"PRAGMA synchronous={synchronous}")
                cls._migrate(path, con, clock)
            cls._check_head(path, con)
            return cls(path, con, clock)
        except sqlite3.DatabaseError as exc:
            con.close()
            raise LedgerCorruptError(path, f"not a readable ledger: {exc}") from exc
        except LedgerError:
            con.close()
            raise

    @staticmethod
    def _migrate(path: Path, con: sqlite3.Connection, clock: Callable[[], float]) -> None:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and tables:
            raise LedgerCorruptError(path, "SQLite file with tables but no ledger schema version")
        if version > SCHEMA_VERSION:
            raise LedgerVersionError(
                path, f"schema version {version} is newer than this gpuflops ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        con.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](con)
            if version == 0:
                content = canonical_json({
                    "seq": 1, "kind": "genesis", "ledger_id": str(uuidlib.uuid4()),
                    "schema_version": SCHEMA_VERSION, "t_s": clock()})
                h = record_hash(GENESIS_PREV_HASH, content)
                con.execute("INSERT INTO records VALUES (1, 'genesis', ?, ?, ?)",
                            (content, GENESIS_PREV_HASH, h))
                con.execute("INSERT INTO chain_head VALUES (1, 1, ?)", (h,))
            else:
                content = canonical_json({"kind": "migration", "from": version,
                                          "to": SCHEMA_VERSION, "t_s": clock()})
                append_record(con, "migration", content)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @staticmethod
    def _check_head(path: Path, con: sqlite3.Connection) -> None:
        head = con.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
        last = con.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if head is None or last is None or tuple(head) != tuple(last):
            raise LedgerCorruptError(
                path, f"chain head {head!r} does not match the last record {last!r}; "
                "run `gpuflops verify` and keep this file as evidence")

    # -- writes ---------------------------------------------------------------------------

    def append_interval(self, t0_s: float, t1_s: float, rows: Sequence[FlopsRow], *,
                        held_from_s: float | None = None) -> int | None:
        """Commit one sampling interval as one record; returns its seq, None if nothing to write.

        Rows with zero FLOPs are dropped; an interval with no work writes nothing.
        ``held_from_s``: the start of the oldest interval not written yet (held for attribution):
        the time a crash right after this record would leave unrecorded starts there.
        """
        t0 = float(t0_s)
        t1 = float(t1_s)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 >= t0):
            raise ValueError(f"bad interval [{t0_s!r}, {t1_s!r}]")
        kept = [r for r in rows if _finite(r.flops, f"flops of {r}") > 0]
        if not kept:
            return None
        body = [[r.gpu, r.uuid, r.pipe, r.precision, r.job, r.program, r.pid, float(r.flops)]
                for r in kept]
        extra = {} if held_from_s is None else {"held_from_s": float(held_from_s)}
        with self._lock:
            return self._write("interval", lambda seq: {"seq": seq, "kind": "interval", "t0_s": t0,
                                            "t1_s": t1, "rows": body, **extra},
                               lambda seq: self._apply_interval(seq, t0, t1, kept))

    def append_job_event(self, kind: JobEventKind | str, job: str, program: str,
                         payload: Mapping[str, Any], t_s: float) -> int:
        """Commit one job event (registration metadata, analytic estimate, end) to the chain.

        An ``estimate`` payload adds ``analytic_flops``, ``tokens`` and ``recompute_flops``
        (this rank's share, covering ``window_t0_s``..``window_t1_s``) to the job's totals.
        """
        if kind not in JOB_EVENT_KINDS:
            raise ValueError(f"unknown job event kind {kind!r}")
        if not job or not program:
            raise ValueError("job and program must be non-empty")
        t = float(t_s)
        data = dict(payload)
        canonical_json(data)  # reject NaN / unserialisable payloads before touching the file
        if kind == "estimate":
            for key in ("analytic_flops", "tokens", "recompute_flops"):
                _finite(float(data.get(key, 0.0)), key)
            w0 = float(data.get("window_t0_s", t))
            w1 = float(data.get("window_t1_s", t))
            if not (math.isfinite(w0) and math.isfinite(w1) and w1 >= w0):
                raise ValueError(f"bad estimate window [{w0!r}, {w1!r}]")
        if kind == "claim":
            value = data.get("value")
            if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"a claim's value must be a fraction in [0, 1], got {value!r}")
        with self._lock:
            return self._write(kind, lambda seq: {"seq": seq, "kind": kind, "job": job,
                                            "program": program, "t_s": t, "payload": data},
                               lambda seq: self._apply_event(seq, kind, job, program, t, data))

    def append_gap(self, t0_s: float, t1_s: float, reason: str,
                   gpus: Sequence[tuple[str, str]]) -> int:
        """Commit one span of unmeasured time for the given (gpu, uuid) pairs (``NODE``: all)."""
        t0, t1 = float(t0_s), float(t1_s)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 >= t0):
            raise ValueError(f"bad gap [{t0_s!r}, {t1_s!r}]")
        if not reason or not gpus:
            raise ValueError("a gap needs a reason and at least one GPU")
        body = sorted({(str(g), str(u)) for g, u in gpus})
        with self._lock:
            return self._write("gap", lambda seq: {"seq": seq, "kind": "gap", "t0_s": t0,
                                                   "t1_s": t1, "reason": reason,
                                                   "gpus": [list(x) for x in body]},
                               lambda seq: apply_gap(self._con, seq, t0, t1, reason, body))

    def append_session(self, event: str, t_s: float, payload: Mapping[str, Any]) -> int:
        """Commit a daemon session event: ``start``, ``stop`` (clean) or ``alive`` (idle)."""
        if event not in SESSION_EVENTS:
            raise ValueError(f"unknown session event {event!r}")
        t = float(t_s)
        if not math.isfinite(t):
            raise ValueError(f"bad session time {t_s!r}")
        data = dict(payload)
        canonical_json(data)
        with self._lock:
            return self._write("session", lambda seq: {"seq": seq, "kind": "session",
                                                       "event": event, "t_s": t,
                                                       "payload": data},
                               lambda seq: None)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Appends inside are one transaction: all of them are committed, or none (group commit,
        one fsync for many records). A ValueError of one append (a bad value, refused before
        anything is written) leaves the others in the batch; any other error rolls it back."""
        with self._lock:
            if self._batch:
                raise RuntimeError("ledger batches do not nest")
            head = self._head_seq, self._head_hash
            try:
                self._con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerWriteError(self.path, f"cannot begin a transaction: {exc}") from exc
            self._batch = True
            try:
                yield
                self._con.execute("COMMIT")
            except BaseException as exc:
                self._head_seq, self._head_hash = head
                if self._con.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._con.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LedgerWriteError(self.path, f"commit failed: {exc}") from exc
                raise
            finally:
                self._batch = False

    def _write(self, kind: str, content_of: Callable[[int], dict[str, Any]],
               apply: Callable[[int], None]) -> int:
        seq = self._head_seq + 1
        content = canonical_json(content_of(seq))
        h = record_hash(self._head_hash, content)
        con = self._con
        if self._batch:  # inside batch(): its transaction commits or rolls back everything
            try:
                con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                            (seq, kind, content, self._head_hash, h))
                con.execute("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, h))
                apply(seq)
            except sqlite3.Error as exc:
                raise LedgerWriteError(self.path, f"append of record {seq} failed: {exc}") from exc
            self._head_seq, self._head_hash = seq, h
            return seq
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                            (seq, kind, content, self._head_hash, h))
                con.execute("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, h))
                apply(seq)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerWriteError(self.path, f"append of record {seq} failed: {exc}") from exc
        self._head_seq = seq
        self._head_hash = h
        return seq

    def _apply_interval(self, seq: int, t0: float, t1: float, rows: Sequence[FlopsRow]) -> None:
        apply_interval(self._con, seq, t0, t1,
                        [(r.gpu, r.uuid, r.pipe, r.precision, r.job, r.program, float(r.flops))
                         for r in rows])

    def _apply_event(self, seq: int, kind: str, job: str, program: str, t: float,
                     data: Mapping[str, Any]) -> None:
        apply_event(self._con, seq, kind, job, program, t, data)

    # -- reads ----------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(sequence number, hash) of the newest record."""
        with self._lock:
            return self._head_seq, self._head_hash

    def totals(self) -> LedgerTotals:
        """Persisted totals, for restoring counters at daemon start."""
        with self._lock:
            return queries.read_totals(self._con, self._head_seq, self._head_hash)

    def job_events(self, program: str | None = None,
                   kinds: Sequence[str] | None = None) -> list[JobEventRecord]:
        """Job events in chain order, optionally for one program and of some kinds only."""
        with self._lock:
            return queries.read_events(self._con, program, kinds)

    def matched_measured(self, job: str, program: str, t0_s: float, t1_s: float) -> float:
        """Measured FLOPs of a job inside [t0_s, t1_s], prorating intervals that straddle it."""
        with self._lock:
            return queries.matched_measured(self._con, job, program, t0_s, t1_s)

    def program_series(self, program: str, max_points: int = 500) -> list[tuple[float, float]]:
        """Cumulative measured FLOPs of a program over time: [(t_s, cumulative_flops)]."""
        with self._lock:
            return queries.program_series(self._con, program, max_points)

    def gaps(self, t0_s: float = float("-inf"), t1_s: float = float("inf")) -> list[Gap]:
        """Gaps overlapping [t0_s, t1_s], in chain order."""
        with self._lock:
            if self._con.execute("SELECT 1 FROM sqlite_master WHERE name = 'gaps'").fetchone() is None:
                return []  # a schema-2 ledger opened read-only: it predates gap records
            rows = self._con.execute(
                "SELECT seq, gpu, uuid, t0_s, t1_s, reason FROM gaps"
                " WHERE t1_s >= ? AND t0_s <= ? ORDER BY seq, gpu, uuid",
                (max(t0_s, -1e300), min(t1_s, 1e300))).fetchall()
        return [Gap(*r) for r in rows]

    def program_jobs(self, program: str) -> dict[JobKey, JobTotals]:
        """The persisted totals of one program's jobs (indexed: cost grows with that program)."""
        with self._lock:
            return queries.program_jobs(self._con, program)

    def programs_changed_since(self, seq: int) -> tuple[set[str], int]:
        """Programs with an interval or a job event after record ``seq``, and the head seq."""
        with self._lock:
            rows = self._con.execute(
                "SELECT program FROM job_intervals WHERE seq > ?"
                " UNION SELECT program FROM job_events WHERE seq > ?", (seq, seq)).fetchall()
            return {r[0] for r in rows}, self._head_seq

    def known_job(self, job_id: str) -> KnownJob | None:
        """A job registered over the socket, as recorded (JobHistory, for the registry)."""
        with self._lock:
            return owners.known_job(self._con, job_id)

    def program_owner(self, program_id: str) -> ProgramOwner | None:
        """A program's first registrant and registered facts (JobHistory)."""
        with self._lock:
            return owners.program_owner(self._con, program_id)

    def last_activity(self) -> LastActivity | None:
        """Until when the ledger is complete: the newest record's time (other than genesis),
        or earlier, where the newest interval or alive record says intervals were still held
        then (``held_from_s``); None for a new ledger."""
        with self._lock:
            row = self._con.execute(
                "SELECT kind, content FROM records WHERE kind != 'genesis'"
                " ORDER BY seq DESC LIMIT 1").fetchone()
            marked = self._con.execute(
                "SELECT content FROM records WHERE kind IN ('interval', 'session')"
                " ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return None
        kind, obj = row[0], json.loads(row[1])
        t = obj.get("t1_s", obj.get("t_s"))
        if not isinstance(t, (int, float)):
            return None
        if marked is not None:
            # Complete through: what the newest interval or session record says was not
            # written yet (held_from_s), else its own end. Job events written after it (the
            # job socket's) say nothing about the GPUs' time.
            mark = json.loads(marked[0])
            held = mark.get("held_from_s", (mark.get("payload") or {}).get("held_from_s"))
            if not isinstance(held, (int, float)):
                held = mark.get("t1_s", mark.get("t_s"))
            if isinstance(held, (int, float)):
                t = min(float(t), float(held))
        return LastActivity(float(t), kind, kind == "session" and obj.get("event") == "stop")

    def session_starts(self) -> list[tuple[float, dict[str, Any]]]:
        """(t_s, payload) of every daemon start recorded: version, backend, counter source."""
        with self._lock:
            rows = self._con.execute(
                "SELECT content FROM records WHERE kind = 'session' ORDER BY seq").fetchall()
        starts = [json.loads(c) for (c,) in rows]
        return [(float(o["t_s"]), dict(o["payload"])) for o in starts if o.get("event") == "start"]

    def verify(self) -> VerifyResult:
        """Check the whole chain on a separate read-only connection (appends keep going)."""
        return verify_path(self.path)

    def verify_and_rebuild(self) -> VerifyResult:
        """Check the whole chain and, where only the derived tables disagree with it, rebuild
        them from it (the daemon does this at start: counters are restored from them)."""
        with self._lock:
            return rebuild_derived(self._con)

    def ledger_id(self) -> str:
        """The random id the genesis record gave this ledger."""
        with self._lock:
            row = self._con.execute("SELECT content FROM records WHERE seq = 1").fetchone()
        return str(json.loads(row[0]).get("ledger_id", "")) if row else ""

    def record_content_at(self, seq: int) -> str | None:
        """The canonical JSON of record ``seq``; None when the chain has no such record."""
        with self._lock:
            row = self._con.execute("SELECT content FROM records WHERE seq = ?",
                                    (seq,)).fetchone()
        return None if row is None else str(row[0])

    def record_hash_at(self, seq: int) -> str | None:
        """The hash of record ``seq``; None when the chain has no such record."""
        with self._lock:
            row = self._con.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()




def open_or_quarantine(path: Path, *, clock: Callable[[], float],
                       synchronous: Synchronous = "FULL") -> tuple[Ledger, Path | None]:
    """Open the ledger; if it is corrupt, move it (and its -wal/-shm) aside and start a new one.

    Returns (ledger, quarantined_path or None). Nothing is deleted: the bad file keeps its
    bytes under ``<name>.corrupt-<unix time>`` and the new ledger's first event names it.
    A LedgerVersionError (newer schema) is not corruption and is re-raised.
    """
    path = Path(path)
    try:
        return Ledger.open(path, clock=clock, synchronous=synchronous), None
    except LedgerVersionError:
        raise
    except LedgerCorruptError as exc:
        reason = exc.message
    stamp = int(clock())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    ledger = Ledger.open(path, clock=clock, synchronous=synchronous)
    with ledger._lock:
        ledger._write("quarantine", lambda seq: {
            "seq": seq, "kind": "quarantine", "t_s": clock(), "moved_to": target.name,
            "sha256": digest, "reason": reason}, lambda seq: None)
    return ledger, target
