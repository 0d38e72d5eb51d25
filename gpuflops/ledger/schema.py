"""The ledger's SQLite schema, its migrations, and the derived tables every record updates.

Derived tables (``gpu_totals``, ``job_totals``, ``job_intervals``, ``job_events``, ``gaps``) are
updated in the same transaction as the record; verification replays them from the chain.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SCHEMA_VERSION = 4

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


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    lambda con: _run_script(con, _SCHEMA_V1),
    lambda con: _run_script(con, _SCHEMA_V2),
    lambda con: _run_script(con, _SCHEMA_V3),
    _migrate_v4,
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


def apply_event(con: sqlite3.Connection, seq: int, kind: str, job: str, program: str,
                 t: float, data: Mapping[str, Any]) -> None:
    con.execute("INSERT INTO job_events VALUES (?, ?, ?, ?, ?)", (seq, kind, job, program, t))
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

