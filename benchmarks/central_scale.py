"""Scale of the fleet tier: what a node writes, what it ships, how fast PostgreSQL takes it, how
much a year of 1,000 nodes x 8 GPUs stores, and how fast one program's report stays.

    python3 benchmarks/central_scale.py [--points 40e6] [--out benchmarks/results/...]

Phases (every figure is measured on this machine; extrapolations say so):
  A  a real daemon replays tests/data/h100-defaults-0.5s.jsonl.gz (one H100 at the default
     0.5 s interval): ledger bytes per record and per busy GPU-day;
  B  an 8-GPU node's chain, written through the real Ledger (each interval holds the H100
     trace's rows for 8 GPUs, one job, an estimate every 2 s): bytes per GPU-day in SQLite;
     rollups of 60 s built from it by the shipper's RollupBuilder: bytes per rollup;
  C  real ingest into PostgreSQL (fsync on, default synchronous_commit) through the ingest
     trigger, signed rollups, one transaction per rollup as nodes ship live, from 4
     connections: rollups/s; bytes per rollup in PostgreSQL (tables and indexes);
     the alternative of shipping raw records: bytes per raw record in PostgreSQL;
  D  one program's report (64 nodes) as the store grows: derived tables bulk-loaded with other
     programs' rows up to --points job points, report latency at each size;
  E  `verify --central` throughput (records/s, signatures included);
  F  phase C's live ingest again, into the store grown by phase D.
It uses the tests' PostgreSQL harness (tests/pgserver.py): initdb and pg_ctl in /tmp.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpuflops.compliance.fleet import build_central_report, load_program  # noqa: E402
from gpuflops.compliance.thresholds import ProgramsConfig  # noqa: E402
from gpuflops.ledger.central import CentralConfig, CentralError, CentralStore, Registration  # noqa: E402
from gpuflops.ledger.central_read import CentralReader  # noqa: E402
from gpuflops.ledger.central_verify import verify_central  # noqa: E402
from gpuflops.ledger.rollup import Replica, RollupBuilder, rollup_signing_message  # noqa: E402
from gpuflops.ledger.ship import RawChainReader  # noqa: E402
from gpuflops.ledger.signing import generate_key  # noqa: E402
from gpuflops.ledger.store import GENESIS_PREV_HASH, FlopsRow, Ledger  # noqa: E402
from tests.pgserver import PgCluster, find_bin_dir  # noqa: E402

TRACE = REPO / "tests" / "data" / "h100-defaults-0.5s.jsonl.gz"
NODES, GPUS, DAY_S, YEAR_DAYS = 1000, 8, 86400.0, 365
ROLLUP_S = 60.0
HEADROOM = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phase_a(tmp: Path) -> dict[str, Any]:
    """A real daemon replaying one H100 at defaults; its ledger's size."""
    state = tmp / "a-state"
    subprocess.run([sys.executable, "-m", "gpuflops", "daemon", "--replay", str(TRACE),
                    "--no-loop", "--speed", "4", "--listen", "127.0.0.1:0", "--no-socket",
                    "--state-dir", str(state)], cwd=REPO, check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    con = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    kinds = dict(con.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall())
    busy = con.execute("SELECT sum(json_extract(content, '$.t1_s') - json_extract(content, '$.t0_s'))"
                       " FROM records WHERE kind = 'interval'").fetchone()[0]
    rows = con.execute("SELECT avg(json_array_length(json_extract(content, '$.rows'))),"
                       " avg(length(content)) FROM records WHERE kind = 'interval'").fetchone()
    con.close()
    size = (state / "ledger.sqlite3").stat().st_size
    n = sum(kinds.values())
    return {"records": n, "kinds": kinds, "busy_gpu_s": busy, "file_bytes": size,
            "bytes_per_record": size / n, "rows_per_interval": rows[0],
            "interval_content_bytes": rows[1],
            "bytes_per_busy_gpu_day": size / busy * DAY_S}


def _real_rows(a_ledger: Path) -> list[list[tuple[str, str, float]]]:
    """(pipe, precision, flops) of each interval record the real daemon wrote in phase A."""
    con = sqlite3.connect(f"file:{a_ledger}?mode=ro", uri=True)
    out = [[(r[2], r[3], float(r[7])) for r in json.loads(c)["rows"]]
           for (c,) in con.execute("SELECT content FROM records WHERE kind = 'interval'")]
    con.close()
    return out


def phase_b(tmp: Path, hours: float = 1.0) -> tuple[dict[str, Any], Path]:
    """An 8-GPU node's chain through the real Ledger; its size; its 60 s rollups."""
    path = tmp / "b-ledger.sqlite3"
    shapes = _real_rows(tmp / "a-state" / "ledger.sqlite3")
    led = Ledger.open(path, clock=time.time, synchronous="NORMAL")
    t = 1.76e9
    led.append_job_event("register", "train-0", "prog", {"attempt": 1, "rank": 0,
                                                        "world_size": 8, "model": "m"}, t)
    n_iv = int(hours * 3600 / 0.5)
    for i in range(n_iv):
        rows = [FlopsRow(str(g), f"GPU-{g:08d}-0000-0000-0000-000000000000", pipe, prec,
                         "train-0", "prog", 1000 + g, flops)
                for g in range(GPUS) for pipe, prec, flops in shapes[i % len(shapes)]]
        led.append_interval(t, t + 0.5, rows)
        if i % 4 == 3:
            led.append_job_event("estimate", "train-0", "prog", {
                "analytic_flops": 3.1e15, "tokens": 8192.0, "recompute_flops": 0.0,
                "adds": 2, "window_t0_s": t - 1.5, "window_t1_s": t + 0.5}, t + 0.5)
        if i % 120 == 0:
            led.append_session("alive", t, {})
        t += 0.5
    led.close()
    size = path.stat().st_size
    reader = RawChainReader(path)
    records = reader.after(0, 10**9)
    reader.close()
    builder = RollupBuilder("00000000-0000-0000-0000-000000000000", "node-0000", "c1",
                            head_seq=0, head_hash=GENESIS_PREV_HASH, raw_seq=0,
                            raw_hash=GENESIS_PREV_HASH, replica=Replica(), period_s=ROLLUP_S,
                            max_records=10**6)
    t0 = time.perf_counter()
    rollups = builder.build(records)
    build_s = time.perf_counter() - t0
    content = [len(r.content.encode()) for r in rollups]
    return {"node_hours": hours, "raw_records": len(records), "file_bytes": size,
            "bytes_per_gpu_day": size / (hours * 3600 * GPUS) * DAY_S,
            "rollups": len(rollups), "rollup_content_bytes_median": statistics.median(content),
            "raw_records_per_rollup": len(records) / len(rollups),
            "rollup_build_us_per_raw_record": build_s / len(records) * 1e6}, path


def _chain(ledger_id: str, node: str, raw: list[Any], key: Any) -> list[tuple[Any, ...]]:
    b = RollupBuilder(ledger_id, node, "c1", head_seq=0, head_hash=GENESIS_PREV_HASH, raw_seq=0,
                      raw_hash=GENESIS_PREV_HASH, replica=Replica(), period_s=ROLLUP_S,
                      max_records=10**6)
    return [(r.seq, r.content, r.prev_hash, r.hash, key.sign(rollup_signing_message(r.hash)))
            for r in b.build(raw)]


def _retarget(raw: list[Any], program: str, job: str) -> list[Any]:
    """The same raw chain for another job/program (contents rewritten, hashes relinked)."""
    from gpuflops.ledger.rollup import RawRecord
    from gpuflops.ledger.store import record_hash

    out, prev = [], GENESIS_PREV_HASH
    for r in raw:
        c = r.content.replace('"prog"', f'"{program}"').replace('"train-0"', f'"{job}"')
        h = record_hash(prev, c)
        out.append(RawRecord(r.seq, r.kind, c, prev, h))
        prev = h
    return out


def phase_c(pg: PgCluster, db: str, b_path: Path, tmp: Path, nodes: int = 64,
            workers: int = 4, alt: bool = True) -> dict[str, Any]:
    """Live ingest through the trigger: one signed rollup per transaction, `workers` nodes at
    a time; then bytes per rollup in PostgreSQL, and bytes per raw record as the alternative."""
    reader = RawChainReader(b_path)
    raw = reader.after(0, 10**9)
    reader.close()
    key = generate_key(tmp / f"node-{uuid.uuid4()}.key")
    chains = {}
    for i in range(nodes):
        lid = str(uuid.uuid4())
        chains[lid] = (f"node-{i:04d}", _chain(lid, f"node-{i:04d}", _retarget(
            raw, "target", f"train-{i % 16}"), key))
    admin = CentralStore(CentralConfig(pg.admin_dsn(db)))
    for lid, (node, _rows) in chains.items():
        admin.register(Registration(lid, node, "c1", key.public_key))
    items = [(lid, row) for lid, (_n, rows) in chains.items() for row in rows]
    # Interleave nodes as a live fleet does: round k of every node, then round k + 1.
    items.sort(key=lambda x: (x[1][0], x[0]))
    lock = threading.Lock()
    pos = [0]

    def work() -> None:
        store = CentralStore(CentralConfig(pg.admin_dsn(db)))
        while True:
            with lock:
                if pos[0] >= len(items):
                    break
                # Round k of every node, then round k + 1: a ledger's records arrive in order
                # (a record whose predecessor is still in flight is retried below).
                lid, row = items[pos[0]]
                pos[0] += 1
            for _attempt in range(100):
                try:
                    store.insert_records(lid, [row])
                    break
                except CentralError as exc:  # its predecessor is still being inserted
                    if exc.sqlstate != "GF003":
                        raise
                    time.sleep(0.001)
        store.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    n = len(items)
    sizes = dict(admin.fetch(
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = 'gpuflops' AND c.relkind = 'r'"))
    total = sum(sizes.values())
    common = {"nodes": nodes, "workers": workers, "rollups": n, "wall_s": wall,
              "rollups_per_s": n / wall}
    if not alt:
        admin.close()
        return common
    # The alternative: raw records as rows (content, hashes), primary key (ledger, seq).
    admin.execute("CREATE TABLE public.raw_alt (ledger_id uuid, seq bigint, kind text,"
                  " content text, prev_hash text, hash text, PRIMARY KEY (ledger_id, seq))")
    lid = str(uuid.uuid4())
    buf = io.StringIO()
    for r in raw:
        buf.write("\t".join([lid, str(r.seq), r.kind, r.content.replace("\\", "\\\\"),
                             r.prev_hash, r.hash]) + "\n")
    with admin.transaction() as cur, cur.copy("COPY public.raw_alt FROM STDIN") as cp:
        cp.write(buf.getvalue())
    raw_bytes = admin.fetch("SELECT pg_total_relation_size('public.raw_alt')")[0][0]
    t1 = time.perf_counter()
    with admin.transaction() as cur:
        cur.executemany("INSERT INTO public.raw_alt VALUES (%s, %s, %s, %s, %s, %s)",
                        [(lid, r.seq + 10**7, r.kind, r.content, r.prev_hash, r.hash)
                         for r in raw[:5000]])
    raw_rate = 5000 / (time.perf_counter() - t1)
    admin.close()
    return {**common, "raw_records_covered_per_s": n / wall * len(raw) / len(
                chains[next(iter(chains))][1]),
            "table_bytes": sizes, "bytes_per_rollup": total / n,
            "raw_alternative": {"bytes_per_raw_record": raw_bytes / len(raw),
                                "insert_rows_per_s_plain": raw_rate}}


def _bulk(admin: CentralStore, points: int, first: int, per_ledger: int = 8760 * 6) -> tuple[float, int]:
    """Other programs' derived rows, COPY'd with triggers off: `points` job points over
    ledgers of `per_ledger` points each (a node-year at one job change per 10 minutes), their
    job totals, events and gaps, for bulk ledgers ``first``, ``first + 1``, ...
    Returns (seconds taken, the next free ledger number)."""
    t0 = time.perf_counter()
    ledgers = max(1, points // per_ledger)
    span = (first, first + ledgers - 1)
    with admin.transaction() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute(
            "INSERT INTO gpuflops.job_points SELECT md5('bulk' || l)::uuid, 'job-' || mod(i, 7),"
            " 'other-' || mod(l, 500), 1.7e9 + i * 600.0, i, i * 1.0e15"
            " FROM generate_series(%s::int, %s::int) l, generate_series(1, %s) i",
            (*span, per_ledger))
        cur.execute(
            "INSERT INTO gpuflops.job_totals SELECT md5('bulk' || l)::uuid, 'job-' || j,"
            " 'other-' || mod(l, 500), 1e20, 1e20, 1e6, 0, 1.7e9, 1.8e9, 1.7e9, 1.8e9, 1"
            " FROM generate_series(%s::int, %s::int) l, generate_series(0, 6) j", span)
        cur.execute(
            "INSERT INTO gpuflops.events SELECT md5('bulk' || l)::uuid, i, 'register',"
            " 'job-' || mod(i, 7), 'other-' || mod(l, 500), 1.7e9 + i, '{\"attempt\": 1}'::jsonb"
            " FROM generate_series(%s::int, %s::int) l, generate_series(1, 200) i", span)
        cur.execute(
            "INSERT INTO gpuflops.gaps SELECT md5('bulk' || l)::uuid, i, '*', '', 1.7e9 + i * 3600,"
            " 1.7e9 + i * 3600 + 30, 'daemon_lost'"
            " FROM generate_series(%s::int, %s::int) l, generate_series(1, 200) i", span)
    admin.execute("ANALYZE")
    return time.perf_counter() - t0, first + ledgers


def phase_d(pg: PgCluster, db: str, max_points: float) -> list[dict[str, Any]]:
    """Report latency of program 'target' (64 nodes) as other programs' rows pile up."""
    admin = CentralStore(CentralConfig(pg.admin_dsn(db)))
    reader = CentralReader(admin)
    out = []
    steps = [0.0] + [max_points * f for f in (0.05, 0.25, 1.0)]
    loaded = 0.0
    next_ledger = 1
    for target in steps:
        if target > loaded:
            secs, next_ledger = _bulk(admin, int(target - loaded), next_ledger)
            loaded = target
            log(f"  bulk-loaded to {loaded:.3g} job points in {secs:.0f} s")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fp = load_program(reader, "target", fallback=ProgramsConfig())
            build_central_report(fp, reader, now_s=time.time(), source={})
            times.append(time.perf_counter() - t0)
        n_points = admin.fetch("SELECT count(*) FROM gpuflops.job_points")[0][0]
        db_bytes = admin.fetch("SELECT pg_database_size(current_database())")[0][0]
        out.append({"job_points": n_points, "database_bytes": db_bytes,
                    "report_s_median": statistics.median(times), "report_s_max": max(times),
                    "target_jobs": len(fp.rows)})
        log(f"  {n_points:,} job points, {db_bytes / 1e9:.1f} GB: report "
            f"{statistics.median(times) * 1000:.0f} ms")
    admin.close()
    return out


def phase_e(pg: PgCluster, db: str) -> dict[str, Any]:
    admin = CentralStore(CentralConfig(pg.admin_dsn(db)))
    t0 = time.perf_counter()
    res = verify_central(CentralReader(admin))
    wall = time.perf_counter() - t0
    admin.close()
    return {"ok": res.ok, "records": res.records, "wall_s": wall,
            "records_per_s": res.records / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=float, default=40e6, help="job points at the largest size")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gfscale"))
    bin_dir = find_bin_dir()
    assert bin_dir is not None, "PostgreSQL (initdb, pg_ctl) is needed"
    pg = PgCluster(bin_dir)
    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "machine": {
        "cpus": os.cpu_count(), "load_at_start": os.getloadavg(),
        "postgres": subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                                   text=True).stdout.strip()}}
    try:
        pg.initdb()
        conf = pg.data / "postgresql.conf"
        # Production-like durability: fsync on (the harness turns it off for tests).
        conf.write_text(conf.read_text().replace("fsync = off", "fsync = on").replace(
            "full_page_writes = off", "full_page_writes = on")
            + "shared_buffers = 512MB\nmax_wal_size = 4GB\n")
        pg.start()
        pg.psql("CREATE DATABASE scale")
        with CentralStore(CentralConfig(pg.admin_dsn("scale"))) as s:
            s.init_schema()
        log("A: real daemon, one H100 at defaults")
        result["a_node_h100"] = phase_a(tmp)
        log(f"  {result['a_node_h100']}")
        log("B: 8-GPU node chain, 1 h")
        result["b_node_8gpu"], b_path = phase_b(tmp)
        log(f"  {result['b_node_8gpu']}")
        log("C: live ingest")
        result["c_ingest"] = phase_c(pg, "scale", b_path, tmp)
        log(f"  {result['c_ingest']}")
        log("E: verify --central")
        result["e_verify"] = phase_e(pg, "scale")
        log(f"  {result['e_verify']}")
        log("D: report latency as the store grows")
        result["d_report"] = phase_d(pg, "scale", args.points)
        log("F: live ingest again, into the grown store")
        result["f_ingest_grown"] = phase_c(pg, "scale", b_path, tmp, alt=False)
        log(f"  {result['f_ingest_grown']}")
    finally:
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    b, c = result["b_node_8gpu"], result["c_ingest"]
    rollups_per_s = NODES / ROLLUP_S
    year_rollups = NODES * YEAR_DAYS * DAY_S / ROLLUP_S
    raw_per_s = NODES * 2.0 + NODES * 0.5  # intervals every 0.5 s, estimates every 2 s
    result["fleet"] = {
        "nodes": NODES, "gpus_per_node": GPUS, "rollup_s": ROLLUP_S,
        "needed_rollups_per_s": rollups_per_s,
        "with_headroom": rollups_per_s * HEADROOM,
        "measured_rollups_per_s": c["rollups_per_s"],
        "headroom": c["rollups_per_s"] / rollups_per_s,
        "year_rollups": year_rollups,
        "year_bytes_central": year_rollups * c["bytes_per_rollup"],
        "bytes_per_gpu_day_central": c["bytes_per_rollup"] * DAY_S / ROLLUP_S / GPUS,
        "bytes_per_gpu_day_node_sqlite": b["bytes_per_gpu_day"],
        "raw_alternative": {
            "records_per_s": raw_per_s, "with_headroom": raw_per_s * HEADROOM,
            "measured_plain_insert_rows_per_s": c["raw_alternative"]["insert_rows_per_s_plain"],
            "year_bytes": raw_per_s * YEAR_DAYS * DAY_S * c["raw_alternative"]["bytes_per_raw_record"],
        },
        "verify_year_hours": year_rollups / result["e_verify"]["records_per_s"] / 3600,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"central-scale-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    log(f"wrote {out}")
    print(json.dumps(result["fleet"], indent=2))
    assert math.isfinite(result["fleet"]["headroom"])


if __name__ == "__main__":
    main()
