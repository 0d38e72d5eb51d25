"""Rollups: what a node ships to the central store, built from its raw chain (pure, no I/O).

A rollup covers a contiguous range of raw records (``raw.first`` .. ``raw.last``) and anchors
the raw chain's hash at its end. It carries, for every job the range touched, the job's
*cumulative* totals after ``raw.last``, computed by replaying the raw records exactly as
``store.py`` maintains its ``job_totals`` table (same operations, same order), so the central
figures are bit-identical to the node's. Job registrations and ends, gaps and session starts and
stops are copied verbatim; intervals and analytic estimates are folded into the totals.

Rollups form a hash chain of their own per ledger (``hash = sha256(prev_hash || content)``, as
in store.py), and the node signs each rollup's hash with its Ed25519 key. docs/fleet.md gives
the figures that led to shipping rollups rather than raw records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpuflops.ledger.records import JobTotals, row_values
from gpuflops.ledger.schema import HMMA_PIPE
from gpuflops.ledger.store import GENESIS_PREV_HASH, JOB_EVENT_KINDS, canonical_json, record_hash

ROLLUP_KIND = "rollup"
ROLLUP_SIGNING_CONTEXT = b"gpuflops rollup v1\n"
VERBATIM_EVENTS = frozenset({"register", "end"})
VERBATIM_SESSIONS = frozenset({"start", "stop"})


def rollup_signing_message(record_hash_hex: str) -> bytes:
    """What a node signs: the rollup's hash (which covers ledger id, seq and content)."""
    return ROLLUP_SIGNING_CONTEXT + record_hash_hex.encode("ascii")


@dataclass(frozen=True)
class RawRecord:
    """One record of a node's SQLite chain, as stored."""

    seq: int
    kind: str
    content: str
    prev_hash: str
    hash: str


class RawChainError(Exception):
    """The local raw chain does not link or hash correctly at ``seq``."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"raw record {seq}: {message}")
        self.seq = seq


def check_raw(records: Sequence[RawRecord], prev_seq: int, prev_hash: str) -> None:
    """Each record follows the previous one: seq, prev_hash link, hash, canonical content."""
    for r in records:
        if r.seq != prev_seq + 1:
            raise RawChainError(prev_seq + 1, f"missing (next record is {r.seq})")
        if r.prev_hash != prev_hash:
            raise RawChainError(r.seq, "prev_hash does not match the previous record's hash")
        if record_hash(prev_hash, r.content) != r.hash:
            raise RawChainError(r.seq, "hash does not match the content")
        try:
            obj = json.loads(r.content)
        except ValueError:
            raise RawChainError(r.seq, "content is not JSON") from None
        if obj.get("seq") != r.seq or obj.get("kind") != r.kind or canonical_json(obj) != r.content:
            raise RawChainError(r.seq, "content does not match its seq/kind or is not canonical")
        prev_seq, prev_hash = r.seq, r.hash


def _lo(old: float | None, new: float) -> float:
    return new if old is None else min(old, new)


def _hi(old: float | None, new: float) -> float:
    return new if old is None else max(old, new)


class Replica:
    """Job totals replayed from raw records with store.py's arithmetic, in chain order.

    store.py adds each interval's per-job sum (rows summed in order from 0.0) to the running
    total, and each estimate's figures likewise; doing the same here keeps every figure
    bit-identical to the node's ``job_totals``. tests/ledger/test_ship.py holds it to that.
    Each update replaces the job's frozen ``JobTotals``: about 3.6 us a raw record more than
    updating in place (benchmarks/central_scale.py's phase B chain), nothing at a node's few
    records a second.
    """

    def __init__(self, seed: Mapping[tuple[str, str], JobTotals] | None = None) -> None:
        self.jobs: dict[tuple[str, str], JobTotals] = dict(seed or {})

    def apply(self, kind: str, obj: Mapping[str, Any]) -> set[tuple[str, str]]:
        """Apply one raw record's content; returns the (job, program) keys it touched."""
        if kind == "interval":
            t0, t1 = float(obj["t0_s"]), float(obj["t1_s"])
            per_job: dict[tuple[str, str], float] = {}
            hmma: dict[tuple[str, str], float] = {}
            for _g, _u, pipe, _pr, job, program, _pid, flops in obj["rows"]:
                per_job[(job, program)] = per_job.get((job, program), 0.0) + float(flops)
                if pipe == HMMA_PIPE:
                    hmma[(job, program)] = hmma.get((job, program), 0.0) + float(flops)
            for key, flops in per_job.items():
                cur = self.jobs.get(key)
                if cur is None:
                    self.jobs[key] = JobTotals(measured_flops=flops, first_t_s=t0, last_t_s=t1,
                                               hmma_flops=hmma.get(key, 0.0))
                else:
                    self.jobs[key] = replace(
                        cur, measured_flops=cur.measured_flops + flops,
                        hmma_flops=cur.hmma_flops + hmma.get(key, 0.0),
                        first_t_s=_lo(cur.first_t_s, t0), last_t_s=_hi(cur.last_t_s, t1))
            return set(per_job)
        if kind == "claim":  # the latest claim stands; it touches no other column (schema.py)
            key = (str(obj["job"]), str(obj["program"]))
            fraction = float(obj["payload"]["value"])
            cur = self.jobs.get(key)
            self.jobs[key] = (JobTotals(half_rate_fraction=fraction) if cur is None
                              else replace(cur, half_rate_fraction=fraction))
            return {key}
        if kind in JOB_EVENT_KINDS:
            key = (str(obj["job"]), str(obj["program"]))
            t = float(obj["t_s"])
            data = obj["payload"]
            analytic = tokens = recompute = 0.0
            w0 = w1 = None
            if kind == "estimate":
                analytic = float(data.get("analytic_flops", 0.0))
                tokens = float(data.get("tokens", 0.0))
                recompute = float(data.get("recompute_flops", 0.0))
                w0 = float(data.get("window_t0_s", t))
                w1 = float(data.get("window_t1_s", t))
            cur = self.jobs.get(key)
            if cur is None:
                self.jobs[key] = JobTotals(0.0, analytic, tokens, recompute, w0, w1, t, t)
            else:
                self.jobs[key] = replace(
                    cur, analytic_flops=cur.analytic_flops + analytic,
                    tokens=cur.tokens + tokens, recompute_flops=cur.recompute_flops + recompute,
                    estimate_t0_s=cur.estimate_t0_s if w0 is None else _lo(cur.estimate_t0_s, w0),
                    estimate_t1_s=cur.estimate_t1_s if w1 is None else _hi(cur.estimate_t1_s, w1),
                    first_t_s=_lo(cur.first_t_s, t), last_t_s=_hi(cur.last_t_s, t))
            return {key}
        return set()


def record_time(kind: str, obj: Mapping[str, Any]) -> float | None:
    t = obj.get("t1_s", obj.get("t_s"))
    return float(t) if isinstance(t, int | float) else None


@dataclass
class _Batch:
    first: int = 0
    last: int = 0
    hash: str = ""
    t0: float | None = None
    t1: float | None = None
    kinds: dict[str, int] = field(default_factory=dict)
    touched: set[tuple[str, str]] = field(default_factory=set)
    events: list[list[Any]] = field(default_factory=list)
    gaps: list[list[Any]] = field(default_factory=list)
    sessions: list[list[Any]] = field(default_factory=list)
    notes: list[list[Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Rollup:
    """One rollup ready to insert: its chain position, canonical content and hashes."""

    seq: int
    content: str
    prev_hash: str
    hash: str
    raw_last: int
    raw_hash: str
    t1_s: float | None


class RollupBuilder:
    """Turns raw records into chained rollups, continuing from the central head."""

    def __init__(self, ledger_id: str, node: str, cluster: str, *, head_seq: int,
                 head_hash: str, raw_seq: int, raw_hash: str, replica: Replica,
                 period_s: float, max_records: int) -> None:
        self.ledger_id, self.node, self.cluster = ledger_id, node, cluster
        self.head_seq, self.head_hash = head_seq, head_hash
        self.raw_seq, self.raw_hash = raw_seq, raw_hash
        self.replica = replica
        self._period_s = period_s
        self._max_records = max_records

    def build(self, records: Iterable[RawRecord]) -> list[Rollup]:
        """Rollups for ``records`` (which must follow raw_seq), at most ``period_s`` of record
        time or ``max_records`` records each. The builder's head moves past them."""
        out: list[Rollup] = []
        batch: _Batch | None = None
        for r in records:
            obj = json.loads(r.content)
            t = record_time(r.kind, obj)
            if batch is not None and (batch.last - batch.first + 1 >= self._max_records or (
                    t is not None and batch.t0 is not None and t - batch.t0 > self._period_s)):
                out.append(self._close(batch))
                batch = None
            if batch is None:
                batch = _Batch(first=r.seq)
            self._add(batch, r, obj, t)
        if batch is not None:
            out.append(self._close(batch))
        return out

    def _add(self, b: _Batch, r: RawRecord, obj: Mapping[str, Any], t: float | None) -> None:
        b.last, b.hash = r.seq, r.hash
        b.kinds[r.kind] = b.kinds.get(r.kind, 0) + 1
        if t is not None:
            b.t0 = t if b.t0 is None else min(b.t0, t)
            b.t1 = t if b.t1 is None else max(b.t1, t)
        b.touched |= self.replica.apply(r.kind, obj)
        if r.kind in VERBATIM_EVENTS:
            b.events.append([r.seq, r.kind, obj["job"], obj["program"], obj["t_s"], obj["payload"]])
        elif r.kind == "gap":
            b.gaps.append([r.seq, obj["t0_s"], obj["t1_s"], obj["reason"], obj["gpus"]])
        elif r.kind == "session":
            if obj.get("event") in VERBATIM_SESSIONS:
                b.sessions.append([r.seq, obj["event"], obj["t_s"], obj.get("payload", {})])
        elif r.kind not in ("interval", "estimate"):
            b.notes.append([r.seq, r.kind, {k: v for k, v in obj.items() if k not in ("seq", "kind")}])

    def _close(self, b: _Batch) -> Rollup:
        seq = self.head_seq + 1
        jobs = [self.replica.jobs[k].row(*k) for k in sorted(b.touched, key=lambda k: (k[1], k[0]))]
        content = canonical_json({
            "kind": ROLLUP_KIND, "seq": seq, "ledger_id": self.ledger_id, "node": self.node,
            "cluster": self.cluster,
            "raw": {"first": b.first, "last": b.last, "hash": b.hash, "t0_s": b.t0, "t1_s": b.t1,
                    "kinds": dict(sorted(b.kinds.items()))},
            "jobs": jobs, "events": b.events, "gaps": b.gaps, "sessions": b.sessions,
            "notes": b.notes,
        })
        h = record_hash(self.head_hash, content)
        rollup = Rollup(seq, content, self.head_hash, h, b.last, b.hash, b.t1)
        self.head_seq, self.head_hash = seq, h
        self.raw_seq, self.raw_hash = b.last, b.hash
        return rollup


@dataclass(frozen=True)
class RollupFault:
    """The first thing wrong with a shipped chain: where and why."""

    seq: int
    reason: str


class RollupChainChecker:
    """Checks a ledger's rollups one by one, in seq order (verify --central)."""

    def __init__(self, ledger_id: str, node: str, cluster: str) -> None:
        self.ledger_id, self.node, self.cluster = ledger_id, node, cluster
        self.seq = 0
        self.hash = GENESIS_PREV_HASH
        self.raw_last = 0
        self.raw_hash = GENESIS_PREV_HASH
        self.jobs: dict[tuple[str, str], list[Any]] = {}
        self.events = 0
        self.gaps = 0

    def check(self, seq: int, content: str, prev_hash: str, stored_hash: str) -> RollupFault | None:
        if seq != self.seq + 1:
            return RollupFault(self.seq + 1, f"record {self.seq + 1} is missing (next is {seq})")
        if prev_hash != self.hash:
            return RollupFault(seq, "prev_hash does not match the previous record's hash "
                                    "(a record before it was edited, deleted or moved)")
        if record_hash(prev_hash, content) != stored_hash:
            return RollupFault(seq, "hash does not match the content (record edited)")
        try:
            obj = json.loads(content)
        except ValueError:
            return RollupFault(seq, "content is not JSON")
        if canonical_json(obj) != content:
            return RollupFault(seq, "content is not in canonical form")
        if obj.get("seq") != seq or obj.get("kind") != ROLLUP_KIND:
            return RollupFault(seq, f"content says seq {obj.get('seq')!r} (record moved)")
        if (obj.get("ledger_id"), obj.get("node"), obj.get("cluster")) != (
                self.ledger_id, self.node, self.cluster):
            return RollupFault(seq, "content names another ledger, node or cluster than the "
                                    "registration")
        try:
            raw = obj["raw"]
            first, last = int(raw["first"]), int(raw["last"])
            if first != self.raw_last + 1 or last < first:
                return RollupFault(seq, f"raw range {first}..{last} does not continue the "
                                        f"previous one (ended at {self.raw_last})")
            jobs = {(str(r[0]), str(r[1])): [*row_values(r), seq] for r in obj["jobs"]}
            events = len(obj["events"])
            gaps = sum(len(g[4]) for g in obj["gaps"])
            raw_hash = str(raw["hash"])
        except (KeyError, TypeError, ValueError, IndexError):
            return RollupFault(seq, "content is not a rollup (fields missing or malformed)")
        self.jobs.update(jobs)
        self.events += events
        self.gaps += gaps
        self.seq, self.hash = seq, stored_hash
        self.raw_last, self.raw_hash = last, raw_hash
        return None
