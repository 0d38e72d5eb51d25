"""The ledger's SQLite schema, its migrations, and the derived tables every record updates.

Derived tables (``gpu_totals``, ``job_totals``, ``job_intervals``, ``job_events``, ``gaps``) are
updated in the same transaction as the record; verification replays them from the chain.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gpuflops.jobs.protocol import PROGRAM_FACTS

SCHEMA_VERSION = 5

_SCHEMA_V1 = """
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    content TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE chain_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE gpu_totals (
    gpu TEXT NOT NULL, uuid TEXT NOT NULL, pipe TEXT NOT NULL, precision TEXT NOT NULL,
    flops REAL NOT NULL,
    PRIMARY KEY (gpu, uuid, pipe, precision)
);
CREATE TABLE job_totals (
    job TEXT NOT NULL, program TEXT NOT NULL,
    measured_flops REAL NOT NULL DEFAULT 0,
    analytic_flops REAL NOT NULL DEFAULT 0,
    tokens REAL NOT NULL DEFAULT 0,
    recompute_flops REAL NOT NULL DEFAULT 0,
    estimate_t0_s REAL, estimate_t1_s REAL,
    first_t_s REAL, last_t_s REAL,
    PRIMARY KEY (job, program)
);
CREATE TABLE job_intervals (
    seq INTEGER NOT NULL, job TEXT NOT NULL, program TEXT NOT NULL,
    t0_s REAL NOT NULL, t1_s REAL NOT NULL, flops REAL NOT NULL,
    PRIMARY KEY (seq, job, program)
);
CREATE INDEX job_intervals_job_t ON job_intervals (job, program, t1_s);
CREATE INDEX job_intervals_program_t ON job_intervals (program, t1_s);
CREATE TABLE job_events (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, job TEXT NOT NULL, program TEXT NOT NULL,
    t_s REAL NOT NULL
);
CREATE INDEX job_events_program ON job_events (program);
"""

# Index i migrates schema version i to i + 1 inside one transaction.
def _run_script(con: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the migration's transaction half-way; run statements singly.
    for statement in script.split(";"):
        if statement.strip():
            con.execute(statement)


# v2: indexes so that program evaluation stays cheap as a job's intervals pile up.
_SCHEMA_V2 = """
CREATE INDEX job_intervals_job_t0 ON job_intervals (job, program, t0_s);
CREATE INDEX job_events_kind ON job_events (kind);
"""

# v3: unmeasured time (sampler gaps, daemon down) as records of its own, indexed by time.
_SCHEMA_V3 = """
CREATE TABLE gaps (
    seq INTEGER NOT NULL, gpu TEXT NOT NULL, uuid TEXT NOT NULL,
    t0_s REAL NOT NULL, t1_s REAL NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (seq, gpu, uuid)
);
CREATE INDEX gaps_t1 ON gaps (t1_s);
"""

# v4: each job's tensor-core (HMMA) measured FLOPs, and its latest half-rate claim: what the
# kernel-census correction needs and bounds (compliance/reconcile.py). Backfilled from the chain.
_SCHEMA_V4 = """
ALTER TABLE job_totals ADD COLUMN hmma_flops REAL NOT NULL DEFAULT 0;
ALTER TABLE job_totals ADD COLUMN half_rate_fraction REAL
"""


def _migrate_v4(con: sqlite3.Connection) -> None:
    import json

    have = {r[1] for r in con.execute("PRAGMA table_info(job_totals)")}
    for statement in _SCHEMA_V4.split(";"):
        column = statement.split("ADD COLUMN")[1].split()[0]
        if column not in have:  # a file that was only relabelled to an older version has them
            con.execute(statement)
    # apply_interval's arithmetic: each interval's rows summed from 0.0, then added to the
    # running total in chain order, so the figure is bit-identical to one written at v4.
    per_job: dict[tuple[str, str], float] = {}
    for (content,) in con.execute(
            "SELECT content FROM records WHERE kind = 'interval' ORDER BY seq"):
        interval: dict[tuple[str, str], float] = {}
        for _g, _u, pipe, _pr, job, program, _pid, flops in json.loads(content)["rows"]:
            if pipe == HMMA_PIPE:
                interval[(job, program)] = interval.get((job, program), 0.0) + float(flops)
        for key, flops in interval.items():
            per_job[key] = per_job.get(key, 0.0) + flops
    for (job, program), flops in per_job.items():
        con.execute("UPDATE job_totals SET hmma_flops = ? WHERE job = ? AND program = ?",
                    (flops, job, program))


# v5: who owns each job and program (the job socket's authorization, docs/protocol.md), whether
# a job ended, and each reporter's highest applied sequence number: what a restarted daemon
# needs so that no one can take over a job or program, reopen an ended job, or have a resent
# batch counted twice. Backfilled from the chain.
_SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS job_owners (
    job TEXT PRIMARY KEY, program TEXT NOT NULL, uid INTEGER NOT NULL, gid INTEGER,
    registered_t_s REAL NOT NULL, ended_t_s REAL
);
CREATE TABLE IF NOT EXISTS program_owners (
    program TEXT PRIMARY KEY, uid INTEGER NOT NULL, defined_t_s REAL NOT NULL,
    base_model_flops REAL, base_model_flops_source TEXT, systemic_risk INTEGER
);
CREATE TABLE IF NOT EXISTS job_clients (
    job TEXT NOT NULL, client TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (job, client)
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events (job, kind);
CREATE INDEX IF NOT EXISTS job_totals_program ON job_totals (program)
"""


def _migrate_v5(con: sqlite3.Connection) -> None:
    import json

    _run_script(con, _SCHEMA_V5)
    for kind, content in con.execute(
            "SELECT kind, content FROM records WHERE kind IN ('register', 'estimate', 'end')"
            " ORDER BY seq").fetchall():
        obj = json.loads(content)
        apply_owners(con, kind, obj["job"], obj["program"], obj["t_s"], obj["payload"])


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    lambda con: _run_script(con, _SCHEMA_V1),
    lambda con: _run_script(con, _SCHEMA_V2),
    lambda con: _run_script(con, _SCHEMA_V3),
    _migrate_v4,
    _migrate_v5,
)

HMMA_PIPE = "hmma"



def apply_interval(con: sqlite3.Connection, seq: int, t0: float, t1: float,
                    rows: Sequence[tuple[str, str, str, str, str, str, float]]) -> None:
    per_job: dict[tuple[str, str], float] = {}
    hmma: dict[tuple[str, str], float] = {}
    for gpu, uuid, pipe, precision, job, program, flops in rows:
        con.execute(
            "INSERT INTO gpu_totals VALUES (?, ?, ?, ?, ?) ON CONFLICT (gpu, uuid, pipe, precision)"
            " DO UPDATE SET flops = flops + excluded.flops",
            (gpu, uuid, pipe, precision, flops))
        per_job[(job, program)] = per_job.get((job, program), 0.0) + flops
        if pipe == HMMA_PIPE:
            hmma[(job, program)] = hmma.get((job, program), 0.0) + flops
    for (job, program), flops in per_job.items():
        con.execute("INSERT INTO job_intervals VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, job, program, t0, t1, flops))
        con.execute(
            "INSERT INTO job_totals (job, program, measured_flops, hmma_flops, first_t_s,"
            " last_t_s) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job, program) DO UPDATE SET"
            " measured_flops = measured_flops + excluded.measured_flops,"
            " hmma_flops = hmma_flops + excluded.hmma_flops,"
            " first_t_s = min(coalesce(first_t_s, excluded.first_t_s), excluded.first_t_s),"
            " last_t_s = max(coalesce(last_t_s, excluded.last_t_s), excluded.last_t_s)",
            (job, program, flops, hmma.get((job, program), 0.0), t0, t1))


def apply_gap(con: sqlite3.Connection, seq: int, t0: float, t1: float, reason: str,
               gpus: Sequence[tuple[str, str]]) -> None:
    for gpu, uuid in gpus:
        con.execute("INSERT INTO gaps VALUES (?, ?, ?, ?, ?, ?)", (seq, gpu, uuid, t0, t1, reason))


def apply_owners(con: sqlite3.Connection, kind: str, job: str, program: str, t: float,
                 data: Mapping[str, Any]) -> None:
    """Owners, ended jobs and reporters' sequence numbers (schema v5) from one job event."""
    if kind == "register":
        owner = data.get("owner") or {"uid": (data.get("peer") or {}).get("uid", 0)}
        con.execute("INSERT OR IGNORE INTO job_owners VALUES (?, ?, ?, ?, ?, NULL)",
                    (job, program, int(owner["uid"]), owner.get("gid"), t))
        con.execute("INSERT OR IGNORE INTO program_owners (program, uid, defined_t_s)"
                    " VALUES (?, ?, ?)", (program, int(owner["uid"]), t))
        facts = [data.get(k) for k in PROGRAM_FACTS]
        if any(f is not None for f in facts):  # the first value of each fact stands
            risk = None if facts[2] is None else int(bool(facts[2]))
            con.execute("UPDATE program_owners SET"
                        " base_model_flops = coalesce(base_model_flops, ?),"
                        " base_model_flops_source = coalesce(base_model_flops_source, ?),"
                        " systemic_risk = coalesce(systemic_risk, ?) WHERE program = ?",
                        (facts[0], facts[1], risk, program))
    elif kind == "end" and data.get("job_ended"):
        con.execute("UPDATE job_owners SET ended_t_s = ? WHERE job = ? AND ended_t_s IS NULL",
                    (t, job))
    elif kind == "estimate":
        for client, client_seq in sorted((data.get("clients") or {}).items()):
            con.execute("INSERT INTO job_clients VALUES (?, ?, ?) ON CONFLICT (job, client)"
                        " DO UPDATE SET seq = max(seq, excluded.seq)", (job, client, int(client_seq)))


def apply_event(con: sqlite3.Connection, seq: int, kind: str, job: str, program: str,
                 t: float, data: Mapping[str, Any]) -> None:
    con.execute("INSERT INTO job_events VALUES (?, ?, ?, ?, ?)", (seq, kind, job, program, t))
    apply_owners(con, kind, job, program, t, data)
    if kind == "refused":  # evidence of a refused request; it changes no total
        return
    if kind == "claim":  # the latest claim of the kind stands (chain order)
        con.execute("INSERT INTO job_totals (job, program, half_rate_fraction) VALUES (?, ?, ?)"
                    " ON CONFLICT (job, program) DO UPDATE SET"
                    " half_rate_fraction = excluded.half_rate_fraction",
                    (job, program, float(data["value"])))
        return
    analytic = tokens = recompute = 0.0
    w0: float | None = None
    w1: float | None = None
    if kind == "estimate":
        analytic = float(data.get("analytic_flops", 0.0))
        tokens = float(data.get("tokens", 0.0))
        recompute = float(data.get("recompute_flops", 0.0))
        w0 = float(data.get("window_t0_s", t))
        w1 = float(data.get("window_t1_s", t))
    con.execute(
        "INSERT INTO job_totals (job, program, analytic_flops, tokens, recompute_flops,"
        " estimate_t0_s, estimate_t1_s, first_t_s, last_t_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job, program) DO UPDATE SET"
        " analytic_flops = analytic_flops + excluded.analytic_flops,"
        " tokens = tokens + excluded.tokens,"
        " recompute_flops = recompute_flops + excluded.recompute_flops,"
        " estimate_t0_s = CASE WHEN excluded.estimate_t0_s IS NULL THEN estimate_t0_s"
        "   ELSE min(coalesce(estimate_t0_s, excluded.estimate_t0_s), excluded.estimate_t0_s) END,"
        " estimate_t1_s = CASE WHEN excluded.estimate_t1_s IS NULL THEN estimate_t1_s"
        "   ELSE max(coalesce(estimate_t1_s, excluded.estimate_t1_s), excluded.estimate_t1_s) END,"
        " first_t_s = min(coalesce(first_t_s, excluded.first_t_s), excluded.first_t_s),"
        " last_t_s = max(coalesce(last_t_s, excluded.last_t_s), excluded.last_t_s)",
        (job, program, analytic, tokens, recompute, w0, w1, t, t))

