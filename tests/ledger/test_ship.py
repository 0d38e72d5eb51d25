"""Shipping a real SQLite ledger to a real PostgreSQL: exact totals, resume, forks, fencing."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from gpuflops.ledger.central import CentralError
from gpuflops.ledger.chain import GENESIS_PREV_HASH, canonical_json, record_hash
from gpuflops.ledger.ship import RawChainReader, Shipper
from gpuflops.ledger.signing import generate_key, load_or_generate
from gpuflops.ledger.store import Ledger
from tests.central_fixtures import CentralDb
from tests.ledger.fleet_helpers import (
    MADE_SHIPPERS,
    central_gaps,
    central_jobs,
    fill,
    local_gaps,
    local_jobs,
)

T0 = 1_760_000_000.0


def _shipper(central: CentralDb, path: Path, key_dir: Path) -> Shipper:
    key, _ = load_or_generate(key_dir / "node.key")
    MADE_SHIPPERS.append(Shipper(central.store("gf_ship"), RawChainReader(path), key,
                                 node="node-a", cluster="c1", period_s=5.0, max_records=500))
    return MADE_SHIPPERS[-1]


def _rewrite(path: Path, seq: int) -> None:
    """A root user edits record ``seq`` and re-hashes every record after it, chain_head too."""
    con = sqlite3.connect(path, isolation_level=None)
    rows = con.execute("SELECT seq, kind, content, prev_hash, hash FROM records ORDER BY seq").fetchall()
    prev = GENESIS_PREV_HASH
    con.execute("BEGIN")
    for s, _kind, content, _p, _h in rows:
        if s == seq:
            obj = json.loads(content)
            obj["t_s" if "t_s" in obj else "t1_s"] = obj.get("t_s", obj.get("t1_s", 0)) + 1e-3
            content = canonical_json(obj)
        h = record_hash(prev, content)
        con.execute("UPDATE records SET content = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (content, prev, h, s))
        prev = h
    con.execute("UPDATE chain_head SET hash = ? WHERE id = 1", (prev,))
    con.execute("COMMIT")
    con.close()


def test_shipped_figures_are_bit_identical_to_the_node_ledger(central: CentralDb, tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "ledger.sqlite3"
    led = Ledger.open(path, clock=lambda: T0)
    t = T0
    shipper = _shipper(central, path, tmp_path)
    for _round in range(4):
        t = fill(led, rng, 700, t)
        assert shipper.run_once() > 0
    led.close()
    st = shipper.status()
    assert st.errors == {} and st.backlog_records == 0 and st.lag_s(time.time()) == 0.0
    assert st.shipped_records == st.central_raw_seq == 4 * 700 + 1
    # A rollup spans at most 1.5 periods (7.5 s) of record time: 16 records 0.5 s apart.
    assert st.shipped_rollups >= 4 * 700 / 16
    with central.store("gf_read") as store:
        ledger_id = st.ledger_id
        assert ledger_id is not None
        assert central_jobs(store, ledger_id) == local_jobs(path)  # every column, every bit
        # ... the v4 ones included: tensor-pipe FLOPs and the latest half-rate claim.
        assert any(v[8] > 0 and v[9] is not None for v in local_jobs(path).values())
        assert central_gaps(store, ledger_id) == local_gaps(path)
        n_events = store.fetch("SELECT count(*) FROM gpuflops.events WHERE ledger_id = %s",
                               (ledger_id,))[0][0]
    local = Ledger.open(path, clock=time.time, readonly=True)
    try:
        assert n_events == len(local.job_events(kinds=("register", "end")))
    finally:
        local.close()


def test_resumes_after_an_outage_from_the_central_head(central: CentralDb, tmp_path: Path) -> None:
    rng = random.Random(8)
    path = tmp_path / "ledger.sqlite3"
    led = Ledger.open(path, clock=lambda: T0)
    t = fill(led, rng, 300, T0)
    shipper = _shipper(central, path, tmp_path)
    assert shipper.run_once() == 301
    central.pg.stop()
    try:
        t = fill(led, rng, 300, t)  # the ledger is the spool
        assert shipper.run_once() == 0
        st = shipper.status()
        assert st.errors.get("connect", 0) >= 1 and st.backlog_records == 300
        assert st.lag_s(t + 10) > 0
    finally:
        central.pg.start()
    # A second shipper (a restarted daemon) and the first one both resume from the head.
    other = _shipper(central, path, tmp_path)
    fill(led, rng, 100, t)
    assert other.run_once() == 400
    assert shipper.run_once() == 0 and shipper.status().backlog_records == 0
    led.close()
    with central.store("gf_read") as store:
        assert central_jobs(store, str(shipper.status().ledger_id)) == local_jobs(path)


@pytest.mark.parametrize("how", ["rewrite", "restore_older_copy"])
def test_local_history_changed_after_shipping_is_a_fork(central: CentralDb, tmp_path: Path,
                                                        how: str) -> None:
    rng = random.Random(9)
    path = tmp_path / "ledger.sqlite3"
    led = Ledger.open(path, clock=lambda: T0)
    t = fill(led, rng, 200, T0)
    led.close()
    shutil.copy(path, tmp_path / "backup.sqlite3")
    led = Ledger.open(path, clock=lambda: T0)
    t = fill(led, rng, 200, t)
    led.close()
    shipper = _shipper(central, path, tmp_path)
    assert shipper.run_once() == 401
    ledger_id = str(shipper.status().ledger_id)
    if how == "rewrite":
        _rewrite(path, 50)
    else:
        shutil.copy(tmp_path / "backup.sqlite3", path)
    led = Ledger.open(path, clock=lambda: T0)
    fill(led, rng, 300, t)
    led.close()
    shipper = _shipper(central, path, tmp_path)  # as after a daemon restart
    assert shipper.run_once() == 0
    st = shipper.status()
    assert st.forks == 1 and st.fenced is not None and "raw record 401" in st.fenced
    with central.store("gf_read") as store:
        forks = store.fetch("SELECT raw_seq, detail FROM gpuflops.forks WHERE ledger_id = %s",
                            (ledger_id,))
        head = store.head(ledger_id)
    assert [f[0] for f in forks] == [401] and "node-a" in forks[0][1]
    assert head is not None and head.failed is not None and head.raw_seq == 401
    # Fenced: the central store refuses anything more for this ledger, whoever sends it.
    with central.store("gf_ship") as ship, pytest.raises(CentralError) as err:
        ship.insert_records(ledger_id, [(head.seq + 1, "{}", head.hash, "0" * 64, b"s" * 64)])
    assert err.value.sqlstate == "GF002"
    assert shipper.run_once() == 0 and shipper.status().forks == 1


def test_a_node_key_that_differs_from_the_registered_one_stops_shipping(
        central: CentralDb, tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    led = Ledger.open(path, clock=lambda: T0)
    fill(led, random.Random(1), 50, T0)
    led.close()
    assert _shipper(central, path, tmp_path / "k1").run_once() == 51
    generate_key(tmp_path / "k2" / "node.key")
    other = _shipper(central, path, tmp_path / "k2")
    assert other.run_once() == 0
    assert other.status().fenced is not None and "registered with public key" in str(other.status().fenced)


def test_unshipped_local_records_that_fail_their_check_stop_shipping(central: CentralDb,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    led = Ledger.open(path, clock=lambda: T0)
    fill(led, random.Random(2), 100, T0)
    led.close()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("UPDATE records SET content = content || ' ' WHERE seq = 60")
    con.close()
    shipper = _shipper(central, path, tmp_path)
    assert shipper.run_once() == 59  # what precedes the bad record ships
    assert "raw record 60" in str(shipper.status().fenced)
