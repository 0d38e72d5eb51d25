"""Read queries over the central store, for reports, the gate, verification and ``central serve``.

Every query that one program's report runs is an index lookup (``job_totals_program``,
``events_program``, ``gaps_t1``, the ``job_points`` and ``program_hours`` keys), so its cost
follows the program's size, not the store's; benchmarks/central_scale.py measures it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpuflops.ledger.central import CentralStore
from gpuflops.ledger.records import Gap, JobEventRecord


@dataclass(frozen=True)
class LedgerRow:
    """A registered node ledger and its shipping head."""

    ledger_id: str
    node: str
    cluster: str
    public_key: bytes
    registered_at_s: float
    head_seq: int
    head_hash: str
    raw_seq: int
    raw_t_s: float | None
    ingested_at_s: float | None
    failed: str | None


@dataclass(frozen=True)
class CentralJobRow:
    """One job's cumulative totals on one node ledger (bit-identical to that node's)."""

    ledger_id: str
    job: str
    program: str
    measured_flops: float
    analytic_flops: float
    tokens: float
    recompute_flops: float
    estimate_t0_s: float | None
    estimate_t1_s: float | None
    first_t_s: float | None
    last_t_s: float | None
    hmma_flops: float = 0.0  # the tensor-core (HMMA) part of measured_flops
    half_rate_fraction: float | None = None  # the job's latest kernel-census claim on the node


Point = tuple[float, float] | None  # (t_s, cumulative measured FLOPs) of a shipped rollup


def interpolate(before: Point, after: Point, t_s: float, first_t_s: float | None) -> float:
    """A job's cumulative measured FLOPs at ``t_s`` between two shipped points, linearly
    (0 at the job's first interval when nothing was shipped before ``t_s``)."""
    t0, v0 = before if before is not None else (first_t_s, 0.0)
    if after is None:
        return v0
    t1, v1 = after
    if t0 is None or t1 <= t0 or t_s <= t0:
        return v0
    return v0 + (v1 - v0) * (t_s - t0) / (t1 - t0)


_JOB_COLS = ("ledger_id::text, job, program, measured_flops, analytic_flops, tokens,"
             " recompute_flops, estimate_t0_s, estimate_t1_s, first_t_s, last_t_s, hmma_flops,"
             " half_rate_fraction")


class CentralReader:
    """Typed reads over a :class:`CentralStore`."""

    def __init__(self, store: CentralStore) -> None:
        self.store = store

    def ledgers(self) -> dict[str, LedgerRow]:
        rows = self.store.fetch(
            "SELECT l.ledger_id::text, l.node, l.cluster, l.public_key,"
            " extract(epoch FROM l.registered_at)::float8, h.seq, h.hash, h.raw_seq, h.raw_t_s,"
            " extract(epoch FROM h.ingested_at)::float8, h.failed"
            " FROM gpuflops.ledgers l JOIN gpuflops.heads h USING (ledger_id)"
            " ORDER BY l.cluster, l.node, l.registered_at")
        return {r[0]: LedgerRow(r[0], r[1], r[2], bytes(r[3]), float(r[4]), int(r[5]), r[6],
                                int(r[7]), r[8], r[9], r[10]) for r in rows}

    def program_jobs(self, program: str) -> list[CentralJobRow]:
        return [CentralJobRow(*r) for r in self.store.fetch(
            f"SELECT {_JOB_COLS} FROM gpuflops.job_totals WHERE program = %s"
            " ORDER BY ledger_id, job", (program,))]

    def ledger_jobs(self, ledger_id: str) -> list[CentralJobRow]:
        return [CentralJobRow(*r) for r in self.store.fetch(
            f"SELECT {_JOB_COLS} FROM gpuflops.job_totals WHERE ledger_id = %s", (ledger_id,))]

    def all_jobs(self) -> list[CentralJobRow]:
        return [CentralJobRow(*r) for r in self.store.fetch(
            f"SELECT {_JOB_COLS} FROM gpuflops.job_totals ORDER BY program, ledger_id, job")]

    def events(self, program: str, kinds: tuple[str, ...] = ("register", "end")
               ) -> list[tuple[str, JobEventRecord]]:
        """(ledger id, event) of a program, in time order."""
        rows = self.store.fetch(
            "SELECT ledger_id::text, raw_seq, kind, job, program, t_s, payload FROM gpuflops.events"
            " WHERE program = %s AND kind = ANY(%s) ORDER BY t_s, ledger_id, raw_seq",
            (program, list(kinds)))
        return [(r[0], JobEventRecord(seq=int(r[1]), kind=r[2], job=r[3], program=r[4], t_s=float(r[5]),
                                payload=dict(r[6]))) for r in rows]

    def events_all(self, kinds: tuple[str, ...] = ("register",)) -> list[tuple[str, JobEventRecord]]:
        """(ledger id, event) of every program, in time order."""
        rows = self.store.fetch(
            "SELECT ledger_id::text, raw_seq, kind, job, program, t_s, payload FROM gpuflops.events"
            " WHERE kind = ANY(%s) ORDER BY t_s, ledger_id, raw_seq", (list(kinds),))
        return [(r[0], JobEventRecord(seq=int(r[1]), kind=r[2], job=r[3], program=r[4], t_s=float(r[5]),
                                payload=dict(r[6]))) for r in rows]

    def gaps(self, ledger_id: str, t0_s: float, t1_s: float) -> list[Gap]:
        rows = self.store.fetch(
            "SELECT raw_seq, gpu, uuid, t0_s, t1_s, reason FROM gpuflops.gaps"
            " WHERE ledger_id = %s AND t1_s >= %s AND t0_s <= %s ORDER BY raw_seq, gpu, uuid",
            (ledger_id, t0_s, t1_s))
        return [Gap(int(r[0]), r[1], r[2], float(r[3]), float(r[4]), r[5]) for r in rows]

    def window_points(self, program: str) -> dict[tuple[str, str], tuple[Point, ...]]:
        """For each (ledger id, job) of ``program`` with an estimate window: the shipped points
        (t_s, cumulative measured FLOPs) just before and after each end of the window, as
        (before_t0, after_t0, before_t1, after_t1), each None where there is none. One query:
        four index lookups per job (job_points' key), whatever the store's size."""

        def side(edge: str, op: str, order: str) -> str:
            return (f"LEFT JOIN LATERAL (SELECT p.t_s, p.measured_flops FROM gpuflops.job_points p"
                    f" WHERE p.ledger_id = t.ledger_id AND p.job = t.job AND p.program = t.program"
                    f" AND p.t_s {op} t.{edge} ORDER BY p.t_s {order}, p.seq {order} LIMIT 1)")

        rows = self.store.fetch(
            "SELECT t.ledger_id::text, t.job, b0.t_s, b0.measured_flops, a0.t_s, a0.measured_flops,"
            " b1.t_s, b1.measured_flops, a1.t_s, a1.measured_flops FROM gpuflops.job_totals t "
            + side("estimate_t0_s", "<=", "DESC") + " b0 ON true "
            + side("estimate_t0_s", ">", "ASC") + " a0 ON true "
            + side("estimate_t1_s", "<=", "DESC") + " b1 ON true "
            + side("estimate_t1_s", ">", "ASC") + " a1 ON true"
            " WHERE t.program = %s AND t.estimate_t0_s IS NOT NULL", (program,))

        def pt(t: Any, v: Any) -> Point:
            return None if t is None else (float(t), float(v))

        return {(r[0], r[1]): (pt(r[2], r[3]), pt(r[4], r[5]), pt(r[6], r[7]), pt(r[8], r[9]))
                for r in rows}

    def session_starts(self, ledger_ids: Sequence[str]) -> list[tuple[float, dict[str, Any]]]:
        """(t_s, payload) of every daemon start the given ledgers shipped, in time order."""
        return [(float(t), dict(p)) for t, p in self.store.fetch(
            "SELECT t_s, payload FROM gpuflops.sessions WHERE ledger_id = ANY(%s::uuid[])"
            " AND event = 'start' ORDER BY t_s, ledger_id, raw_seq", (list(ledger_ids),))]

    def program_hours(self, program: str) -> list[tuple[int, float]]:
        return [(int(h), float(v)) for h, v in self.store.fetch(
            "SELECT hour, measured_flops FROM gpuflops.program_hours WHERE program = %s"
            " ORDER BY hour", (program,))]

    def head_record(self, ledger_id: str, seq: int) -> tuple[str, bytes] | None:
        """(hash, signature) of one shipped record."""
        rows = self.store.fetch("SELECT hash, sig FROM gpuflops.records WHERE ledger_id = %s"
                                " AND seq = %s", (ledger_id, seq))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def forks(self) -> list[tuple[str, int, str, float]]:
        """(ledger id, raw seq, detail, detected at) of every reported fork."""
        return [(r[0], int(r[1]), r[2], float(r[3])) for r in self.store.fetch(
            "SELECT ledger_id::text, raw_seq, detail, extract(epoch FROM detected_at)::float8"
            " FROM gpuflops.forks ORDER BY id")]

    def records(self, ledger_id: str) -> Iterator[tuple[int, str, str, str, bytes]]:
        """(seq, content, prev_hash, hash, sig) of a ledger's chain, in seq order (streamed)."""
        for seq, content, prev, h, sig in self.store.stream(
                "SELECT seq, content, prev_hash, hash, sig FROM gpuflops.records"
                " WHERE ledger_id = %s ORDER BY seq", (ledger_id,)):
            yield int(seq), content, prev, h, bytes(sig)

    def derived_counts(self, ledger_id: str) -> dict[str, Any]:
        """Row counts of a ledger's derived tables (verify compares them with the chain)."""
        out = {}
        for table in ("events", "gaps", "job_totals", "job_points"):
            out[table] = self.store.fetch(
                f"SELECT count(*) FROM gpuflops.{table} WHERE ledger_id = %s", (ledger_id,))[0][0]
        return out
