"""Reads of what the job socket's authorization needs across restarts (schema v5): who owns a
job or a program, whether a job ended, its analytic totals and its reporters' sequence numbers.

The registry asks for a job only when it is not in memory (a restart, or a job idle long
enough to leave memory), so these reads are indexed point lookups.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gpuflops.jobs.protocol import METADATA_FIELDS, PER_RANK_FIELDS, PROGRAM_FACTS
from gpuflops.jobs.records import KnownJob, ProgramOwner


def _has_owner_tables(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE name = 'job_owners'").fetchone() \
        is not None


def known_job(con: sqlite3.Connection, job: str) -> KnownJob | None:
    """The job as the ledger recorded it, or None if it was never registered over the socket."""
    if not _has_owner_tables(con):  # an older file opened read-only
        return None
    row = con.execute("SELECT program, uid, gid, registered_t_s, ended_t_s FROM job_owners"
                      " WHERE job = ?", (job,)).fetchone()
    if row is None:
        return None
    program, uid, gid, registered, ended = row
    totals = con.execute("SELECT analytic_flops, tokens, recompute_flops FROM job_totals"
                         " WHERE job = ? AND program = ?", (job, program)).fetchone()
    clients = dict(con.execute("SELECT client, seq FROM job_clients WHERE job = ?", (job,)))
    participants: dict[str, bool] = {}
    metadata: dict[str, Any] = {}
    for (content,) in con.execute(
            "SELECT r.content FROM job_events e JOIN records r ON r.seq = e.seq"
            " WHERE e.job = ? AND e.kind IN ('register', 'end') ORDER BY e.seq", (job,)):
        obj = json.loads(content)
        payload = obj["payload"]
        pid = (payload.get("peer") or {}).get("pid")
        rank = payload.get("rank")
        key = f"rank:{rank}" if rank is not None else f"pid:{pid}"
        if obj["kind"] == "register":
            participants.setdefault(key, False)
            for name in METADATA_FIELDS:
                if name not in PER_RANK_FIELDS and payload.get(name) is not None:
                    metadata.setdefault(name, payload[name])
        elif key in participants:
            participants[key] = True
    return KnownJob(
        job_id=job, program_id=program, owner_uid=int(uid), owner_gid=gid,
        registered_s=float(registered), ended_s=ended,
        analytic_flops=float(totals[0]) if totals else 0.0,
        analytic_tokens=float(totals[1]) if totals else 0.0,
        recompute_flops=float(totals[2]) if totals else 0.0,
        clients=clients, participants=participants, metadata=metadata)


def program_owner(con: sqlite3.Connection, program: str) -> ProgramOwner | None:
    """The program's first registrant and the base-model facts registered for it."""
    if not _has_owner_tables(con):
        return None
    row = con.execute("SELECT uid, base_model_flops, base_model_flops_source, systemic_risk"
                      " FROM program_owners WHERE program = ?", (program,)).fetchone()
    if row is None:
        return None
    values = (row[1], row[2], None if row[3] is None else bool(row[3]))
    return ProgramOwner(int(row[0]), {k: v for k, v in zip(PROGRAM_FACTS, values, strict=True)
                                      if v is not None})
