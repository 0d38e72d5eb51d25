"""The central store's schema in a real PostgreSQL: roles, ingest checks, forks."""

from __future__ import annotations

import uuid

import pytest

from gpuflops.ledger.central import CentralConfig, CentralError, CentralStore, Registration
from gpuflops.ledger.chain import GENESIS_PREV_HASH, canonical_json, record_hash
from gpuflops.ledger.records import JobTotals
from gpuflops.ledger.rollup import RawRecord, Replica, RollupBuilder
from tests.central_fixtures import CentralDb


def _raw_chain(n: int, t0: float = 1000.0) -> list[RawRecord]:
    """A raw chain: genesis, then ``n`` intervals of one job, as store.py writes them."""
    out = []
    prev = GENESIS_PREV_HASH
    for seq in range(1, n + 2):
        if seq == 1:
            obj = {"seq": 1, "kind": "genesis", "ledger_id": "x", "schema_version": 3, "t_s": t0}
        else:
            t = t0 + (seq - 2) * 0.5
            obj = {"seq": seq, "kind": "interval", "t0_s": t, "t1_s": t + 0.5,
                   "rows": [["0", "GPU-a", "hmma", "bf16", "job1", "prog", 42, 1.5e14 + seq]]}
        content = canonical_json(obj)
        h = record_hash(prev, content)
        out.append(RawRecord(seq, obj["kind"], content, prev, h))
        prev = h
    return out


def _builder(ledger: str, period_s: float = 10.0) -> RollupBuilder:
    return RollupBuilder(ledger, "node-a", "c1", head_seq=0, head_hash=GENESIS_PREV_HASH,
                         raw_seq=0, raw_hash=GENESIS_PREV_HASH, replica=Replica(),
                         period_s=period_s, max_records=1000)


def _register(store: CentralStore, ledger: str) -> None:
    store.register(Registration(ledger, "node-a", "c1", b"k" * 32))


def test_ship_role_appends_and_cannot_update_or_delete(central: CentralDb) -> None:
    ledger = str(uuid.uuid4())
    rollups = _builder(ledger).build(_raw_chain(60))
    assert len(rollups) == 3
    with central.store("gf_ship") as ship:
        _register(ship, ledger)
        ship.insert_records(ledger, [(r.seq, r.content, r.prev_hash, r.hash, b"s" * 64)
                                     for r in rollups])
        head = ship.head(ledger)
        assert head is not None and head.seq == 3 and head.raw_seq == 61
        for sql in ("UPDATE gpuflops.records SET content = 'x'",
                    "DELETE FROM gpuflops.records",
                    "UPDATE gpuflops.heads SET seq = 0",
                    "DELETE FROM gpuflops.ledgers",
                    "TRUNCATE gpuflops.records",
                    "INSERT INTO gpuflops.job_totals VALUES ("
                    f"'{ledger}', 'j', 'p', 1, 1, 1, 1, null, null, null, null, 1)"):
            with pytest.raises(CentralError) as err:
                ship.execute(sql)
            assert err.value.kind == "privilege", sql
    with central.admin() as admin:
        rows = admin.fetch("SELECT measured_flops, hmma_flops FROM gpuflops.job_totals"
                           " WHERE ledger_id = %s", (ledger,))
    replica = Replica()
    for r in _raw_chain(60):
        import json
        replica.apply(r.kind, json.loads(r.content))
    cum = replica.jobs[("job1", "prog")]
    assert rows == [(cum.measured_flops, cum.hmma_flops)] and cum.hmma_flops > 0


@pytest.mark.parametrize("what", ["duplicate", "fork", "bad_link", "bad_hash", "gap_in_raw"])
def test_ingest_refuses_what_does_not_follow_the_head(central: CentralDb, what: str) -> None:
    ledger = str(uuid.uuid4())
    rollups = _builder(ledger).build(_raw_chain(60))
    first = [(r.seq, r.content, r.prev_hash, r.hash, b"s" * 64) for r in rollups[:2]]
    with central.store("gf_ship") as ship:
        _register(ship, ledger)
        ship.insert_records(ledger, first)
        r = rollups[2]
        offered = {
            "duplicate": first[1],
            "fork": (2, r.content.replace('"seq":3', '"seq":2'), first[0][3],
                     record_hash(first[0][3], r.content.replace('"seq":3', '"seq":2')), b"s" * 64),
            "bad_link": (3, r.content, "f" * 64, r.hash, b"s" * 64),
            "bad_hash": (3, r.content, r.prev_hash, "e" * 64, b"s" * 64),
            "gap_in_raw": None,
        }[what]
        if offered is None:  # a rollup that skips raw records
            b = _builder(ledger)
            b.build(_raw_chain(60)[:30])
            skipped = RollupBuilder(ledger, "node-a", "c1", head_seq=2, head_hash=first[1][3],
                                    raw_seq=45, raw_hash="0" * 64, replica=Replica(),
                                    period_s=100, max_records=100).build(_raw_chain(60)[45:])
            offered = (3, skipped[0].content, skipped[0].prev_hash, skipped[0].hash, b"s" * 64)
        with pytest.raises(CentralError) as err:
            ship.insert_records(ledger, [offered])
        assert err.value.kind == "refused"
        assert err.value.sqlstate == {"duplicate": "GF003", "fork": "GF003", "bad_link": "GF004",
                                      "bad_hash": "GF005", "gap_in_raw": "GF008"}[what]
        head = ship.head(ledger)
        assert head is not None and head.seq == 2


def test_password_in_url_is_refused() -> None:
    with pytest.raises(CentralError, match="contains a password"):
        CentralConfig.from_options("postgresql://u:secret@127.0.0.1/db")
    cfg = CentralConfig.from_options("postgresql://u@127.0.0.1/db?sslmode=verify-full")
    assert cfg.describe() == {"host": "127.0.0.1", "dbname": "db", "user": "u",
                              "sslmode": "verify-full"}


def test_job_totals_row_roundtrip() -> None:
    row = ["j", "p", 1.0, 2.0, 3.0, 4.0, None, None, 5.0, 6.0, 0.5, 0.25]
    key, cum = JobTotals.from_row(row)
    assert key == ("j", "p") and cum.row("j", "p") == row
    # A rollup shipped before the v4 columns: no HMMA FLOPs, no claim.
    _key, old = JobTotals.from_row(row[:10])
    assert old.row("j", "p") == [*row[:10], 0.0, None]
