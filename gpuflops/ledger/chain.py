"""The hash chain: canonical record content, record hashes, appends, and full verification.

Every record stores the hash of the record before it; ``hash = sha256(prev_hash || canonical
JSON of the content)`` and the content carries its own sequence number, so editing, deleting or
reordering a record breaks the chain. ``verify_path`` checks the chain, the head and the derived
tables (replayed from the chain) of a ledger file without writing to it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpuflops.ledger.records import JOB_EVENT_KINDS, VerifyResult
from gpuflops.ledger.schema import MIGRATIONS, apply_event, apply_gap, apply_interval

GENESIS_PREV_HASH = "0" * 64


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def record_hash(prev_hash: str, content: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + content.encode("utf-8")).hexdigest()


HASH_PREFIX_HEX = 13  # 52 bits: what a float64 (a Prometheus sample) holds exactly


def hash_prefix(digest: str) -> int:
    """The first 52 bits of a record hash, as exported in gpuflops_ledger_head_hash_prefix."""
    return int(digest[:HASH_PREFIX_HEX], 16)


def append_record(con: sqlite3.Connection, kind: str, partial_content: str) -> None:
    head = con.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    seq = head[0] + 1
    obj = json.loads(partial_content)
    obj["seq"] = seq
    content = canonical_json(obj)
    h = record_hash(head[1], content)
    con.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (seq, kind, content, head[1], h))
    con.execute("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, h))



def iter_records(con: sqlite3.Connection) -> Iterator[tuple[int, str, str, str, str]]:
    yield from con.execute("SELECT seq, kind, content, prev_hash, hash FROM records ORDER BY seq")


def verify_path(path: Path) -> VerifyResult:
    """Check a ledger file's chain, head and derived totals without writing to it."""
    path = Path(path)
    if not path.exists():
        return VerifyResult(False, 0, None, f"{path} does not exist", "")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return VerifyResult(False, 0, None, f"cannot open: {exc}", "")
    try:
        con.execute("BEGIN")  # one consistent snapshot while the daemon keeps appending
        return _verify(con)
    except sqlite3.DatabaseError as exc:
        return VerifyResult(False, 0, None, f"not a readable ledger: {exc}", "")
    finally:
        con.close()


def _verify(con: sqlite3.Connection, rebuilt: list[sqlite3.Connection] | None = None
            ) -> VerifyResult:
    prev_hash = GENESIS_PREV_HASH
    expected_seq = 1
    count = 0
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    for migrate in MIGRATIONS:
        migrate(scratch)

    def bad(seq: int | None, reason: str) -> VerifyResult:
        scratch.close()
        return VerifyResult(False, count, seq, reason, prev_hash, expected_seq - 1)

    for seq, kind, content, stored_prev, stored_hash in iter_records(con):
        if seq != expected_seq:
            return bad(expected_seq, f"record {expected_seq} is missing (next is {seq})")
        if stored_prev != prev_hash:
            return bad(seq, "prev_hash does not match the previous record's hash "
                            "(a record before it was edited, deleted or moved)")
        if record_hash(prev_hash, content) != stored_hash:
            return bad(seq, "hash does not match the content (record edited)")
        try:
            obj = json.loads(content)
        except ValueError:
            return bad(seq, "content is not JSON")
        if obj.get("seq") != seq:
            return bad(seq, f"content says seq {obj.get('seq')!r} (record moved)")
        if obj.get("kind") != kind:
            return bad(seq, "kind column does not match the content")
        if canonical_json(obj) != content:
            return bad(seq, "content is not in canonical form")
        if seq == 1 and kind != "genesis":
            return bad(seq, "first record is not the genesis record")
        if kind == "interval":
            rows = [(g, u, p, pr, j, prog, float(f)) for g, u, p, pr, j, prog, _pid, f
                    in obj["rows"]]
            apply_interval(scratch, seq, obj["t0_s"], obj["t1_s"], rows)
        elif kind in JOB_EVENT_KINDS:
            apply_event(scratch, seq, kind, obj["job"], obj["program"], obj["t_s"],
                         obj["payload"])
        elif kind == "gap":
            apply_gap(scratch, seq, obj["t0_s"], obj["t1_s"], obj["reason"],
                       [(g, u) for g, u in obj["gpus"]])
        prev_hash = stored_hash
        expected_seq = seq + 1
        count += 1
    head = con.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    if count == 0:
        return bad(1, "ledger has no records (genesis missing)")
    if head is None:
        return bad(None, "chain_head is missing")
    if head[0] != expected_seq - 1 or head[1] != prev_hash:
        return bad(expected_seq if head[0] >= expected_seq else head[0],
                   f"chain_head says seq {head[0]} but the chain ends at {expected_seq - 1}"
                   " (records deleted from the end, or chain_head edited)")
    if rebuilt is not None:
        rebuilt.append(scratch)  # the derived tables as the chain implies them
    mismatch = _compare_derived(con, scratch)
    if mismatch:
        return VerifyResult(False, count, None, mismatch, prev_hash, expected_seq - 1,
                            derived_only=True)
    return VerifyResult(True, count, None, None, prev_hash, expected_seq - 1)


# Every derived table and the columns that order its rows; every column is compared, exactly:
# the replay adds the same floats in the same order, so even sums are bit-identical, and a
# time moved by a millisecond is as wrong as one moved by an hour.
DERIVED_TABLES: dict[str, str] = {
    "gpu_totals": "gpu, uuid, pipe, precision",
    "job_totals": "job, program",
    "job_intervals": "seq, job, program",
    "job_events": "seq",
    "gaps": "seq, gpu, uuid",
    "job_owners": "job",
    "program_owners": "program",
    "job_clients": "job, client",
}


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in con.execute(f"PRAGMA table_info({table})")]


def _compare_derived(con: sqlite3.Connection, scratch: sqlite3.Connection) -> str | None:
    """Compare the derived tables (which restore counters) with a replay of the chain."""
    present = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, order in DERIVED_TABLES.items():
        if table not in present:  # a file of an older schema, read without migrating it
            if scratch.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                return f"derived table {table} is missing, the chain has records for it"
            continue
        stored_cols = _columns(con, table)
        replay_cols = _columns(scratch, table)
        if [c for c in stored_cols if c not in replay_cols]:
            return f"derived table {table} has columns the schema does not define"
        # An older file lacks the columns later versions added: compare those it has.
        cols = ", ".join(c for c in replay_cols if c in stored_cols)
        sql = f"SELECT {cols} FROM {table} ORDER BY {order}"
        stored = con.execute(sql).fetchall()
        replayed = scratch.execute(sql).fetchall()
        if len(stored) != len(replayed):
            return f"derived table {table} has {len(stored)} rows, chain implies {len(replayed)}"
        for a, b in zip(stored, replayed, strict=True):
            if a != b or any(type(x) is not type(y) for x, y in zip(a, b, strict=True)):
                return f"derived table {table} row {a!r} differs from the chain ({b!r})"
    return None


def rebuild_derived(con: sqlite3.Connection) -> VerifyResult:
    """Verify the chain on ``con`` (a writable connection, no transaction open) and, if only the
    derived tables disagree with it, replace them with the chain's replay in one transaction.

    Returns the verification as it was before any rebuild."""
    replays: list[sqlite3.Connection] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        result = _verify(con, replays)
        if not result.ok and result.derived_only:
            scratch = replays[0]
            for table in DERIVED_TABLES:
                cols = _columns(scratch, table)
                con.execute(f"DELETE FROM {table}")
                rows = scratch.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
                con.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                                f"({', '.join('?' * len(cols))})", rows)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        for scratch in replays:
            scratch.close()
    return result
