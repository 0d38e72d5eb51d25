"""The ledger's reads behind ``Ledger``'s methods: totals, events, matched measured FLOPs and
a program's series. Each takes the connection; the caller holds the ledger's lock."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence

from gpuflops.ledger.records import GpuKey, JobEventRecord, JobKey, JobTotals, LedgerTotals


def read_totals(con: sqlite3.Connection, head_seq: int, head_hash: str) -> LedgerTotals:
    gpu = {GpuKey(g, u, p, pr): f
           for g, u, p, pr, f in con.execute("SELECT * FROM gpu_totals")}
    jobs = {}
    cols = {r[1] for r in con.execute("PRAGMA table_info(job_totals)")}
    v4 = ", hmma_flops, half_rate_fraction" if "hmma_flops" in cols else ""  # else older, read-only
    for row in con.execute(
            "SELECT job, program, measured_flops, analytic_flops, tokens, recompute_flops,"
            f" estimate_t0_s, estimate_t1_s, first_t_s, last_t_s{v4} FROM job_totals"):
        jobs[JobKey(row[0], row[1])] = JobTotals(*row[2:])
    records = con.execute("SELECT count(*) FROM records").fetchone()[0]
    return LedgerTotals(gpu=gpu, jobs=jobs, records=records, head_seq=head_seq,
                        head_hash=head_hash)


def program_jobs(con: sqlite3.Connection, program: str) -> dict[JobKey, JobTotals]:
    cols = {r[1] for r in con.execute("PRAGMA table_info(job_totals)")}
    v4 = ", hmma_flops, half_rate_fraction" if "hmma_flops" in cols else ""
    return {JobKey(row[0], row[1]): JobTotals(*row[2:]) for row in con.execute(
        "SELECT job, program, measured_flops, analytic_flops, tokens, recompute_flops,"
        f" estimate_t0_s, estimate_t1_s, first_t_s, last_t_s{v4} FROM job_totals"
        " WHERE program = ?", (program,))}


def read_events(con: sqlite3.Connection, program: str | None,
                 kinds: Sequence[str] | None = None) -> list[JobEventRecord]:
    where, params = [], []
    if program is not None:
        where.append("e.program = ?")
        params.append(program)
    if kinds is not None:
        where.append(f"e.kind IN ({', '.join('?' * len(kinds))})")
        params.extend(kinds)
    sql = ("SELECT r.seq, r.content FROM job_events e JOIN records r ON r.seq = e.seq"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.seq")
    out = []
    for seq, content in con.execute(sql, params):
        obj = json.loads(content)
        out.append(JobEventRecord(seq=seq, kind=obj["kind"], job=obj["job"], program=obj["program"],
                            t_s=obj["t_s"], payload=obj["payload"]))
    return out


def matched_measured(con: sqlite3.Connection, job: str, program: str,
                      t0_s: float, t1_s: float) -> float:
    """A job's measured FLOPs inside [t0_s, t1_s], intervals cut pro rata at the edges.

    Computed as the job's total minus what lies outside the window: only the intervals at the
    window's ends are read (indexed), so the cost does not grow with the job's length.
    """
    total = con.execute("SELECT measured_flops FROM job_totals WHERE job = ? AND program = ?",
                        (job, program)).fetchone()
    row = con.execute(
        "SELECT sum(flops - CASE WHEN t1_s <= t0_s THEN"
        "   (CASE WHEN t1_s >= :a AND t0_s <= :b THEN flops ELSE 0.0 END)"
        " ELSE flops * max(0.0, min(t1_s, :b) - max(t0_s, :a)) / (t1_s - t0_s) END) FROM ("
        " SELECT t0_s, t1_s, flops FROM job_intervals"
        "  WHERE job = :job AND program = :program AND t1_s > :b"
        " UNION ALL SELECT t0_s, t1_s, flops FROM job_intervals"
        "  WHERE job = :job AND program = :program AND t0_s < :a AND t1_s <= :b)",
        {"a": t0_s, "b": t1_s, "job": job, "program": program}).fetchone()
    inside = (float(total[0]) if total else 0.0) - float(row[0] or 0.0)
    return max(0.0, inside)


def program_series(con: sqlite3.Connection, program: str,
                    max_points: int) -> list[tuple[float, float]]:
    n = con.execute("SELECT count(*) FROM job_intervals WHERE program = ?",
                    (program,)).fetchone()[0]
    if n == 0:
        return []
    stride = max(1, math.ceil(n / max(1, max_points)))
    out: list[tuple[float, float]] = []
    total = 0.0
    last_t = 0.0
    for i, (t1, flops) in enumerate(con.execute(
            "SELECT t1_s, flops FROM job_intervals WHERE program = ? ORDER BY t1_s, seq",
            (program,))):
        total += flops
        last_t = t1
        if i % stride == 0:
            out.append((t1, total))
    if out[-1] != (last_t, total):
        out.append((last_t, total))
    return out
