"""Ledger pieces that must stay cheap as it grows: matched-window sums, registration reads,
schema migration, and the daemon sink's commit cadence."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from gpuflops.exporter.state import Totals
from gpuflops.ledger.schema import SCHEMA_VERSION
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow, GpuInfo
from gpuflops.pipeline.pipeline import Batch, count_committed
from tests.support import FakeClock


def _row(job: str, flops: float) -> FlopsRow:
    return FlopsRow("0", "GPU-x", "hmma", "bf16", job, "p", 1, flops)


def test_matched_measured_equals_a_direct_pro_rata_sum(tmp_path: Path) -> None:
    rng = random.Random(7)
    led = Ledger.open(tmp_path / "l.sqlite3", clock=time.time, synchronous="NORMAL")
    spans: list[tuple[float, float, float]] = []
    t = 100.0
    for _ in range(400):
        dt = rng.choice([0.0, 0.1, 0.5, 1.3])  # zero-length intervals included
        flops = rng.uniform(1e12, 1e14)
        led.append_interval(t, t + dt, [_row("j", flops), _row("other", 1e13)])
        spans.append((t, t + dt, flops))
        t += dt + rng.choice([0.0, 0.2])
    try:
        for _ in range(60):
            a = rng.uniform(90.0, t + 5)
            b = a + rng.uniform(0.0, 60.0)
            want = 0.0
            for t0, t1, f in spans:
                if t1 <= t0:
                    want += f if (t1 >= a and t0 <= b) else 0.0
                else:
                    want += f * max(0.0, min(t1, b) - max(t0, a)) / (t1 - t0)
            got = led.matched_measured("j", "p", a, b)
            assert got == pytest.approx(want, rel=1e-9, abs=1e3)
    finally:
        led.close()


def test_only_registrations_are_read_when_asked(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "l.sqlite3", clock=time.time, synchronous="NORMAL")
    try:
        led.append_job_event("register", "j", "p", {"model": "m"}, 1.0)
        for i in range(50):
            led.append_job_event("estimate", "j", "p", {"analytic_flops": 1.0, "tokens": 1,
                                                       "recompute_flops": 0.0}, 2.0 + i)
        led.append_job_event("end", "j", "p", {}, 99.0)
        assert [e.kind for e in led.job_events(kinds=("register",))] == ["register"]
        assert len(led.job_events()) == 52
        assert [e.kind for e in led.job_events("p", kinds=("register", "end"))] == [
            "register", "end"]
    finally:
        led.close()


def test_a_migrated_ledgers_hmma_totals_equal_a_ledger_written_at_v4(tmp_path: Path) -> None:
    """The v4 backfill sums each interval's HMMA rows, then adds them up in chain order, as
    live writes do: a migrated ledger's figure is bit-identical to one written at v4 (and so
    to what the central store replays from it)."""
    rng = random.Random(4)
    paths = [tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"]
    leds = [Ledger.open(p, clock=time.time, synchronous="NORMAL") for p in paths]
    for i in range(300):
        rows = [FlopsRow(str(g), f"GPU-{g}", "hmma", "bf16", "j", "p", 1, rng.uniform(1e11, 3e14))
                for g in range(rng.randint(1, 4))]
        for led in leds:
            led.append_interval(float(i), i + 0.5, rows)
    for led in leds:
        led.close()
    con = sqlite3.connect(paths[0])  # the first as a v3 ledger: no v4 columns
    con.execute("ALTER TABLE job_totals DROP COLUMN hmma_flops")
    con.execute("ALTER TABLE job_totals DROP COLUMN half_rate_fraction")
    con.execute("PRAGMA user_version=3")
    con.commit()
    con.close()
    hmma = []
    for p in paths:
        led = Ledger.open(p, clock=time.time, synchronous="NORMAL")
        try:
            hmma.append([t.hmma_flops for t in led.totals().jobs.values()])
        finally:
            led.close()
    assert hmma[0] == hmma[1] and hmma[0][0] > 0


def test_a_version_1_ledger_is_migrated_in_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    led = Ledger.open(path, clock=time.time, synchronous="NORMAL")
    led.append_interval(1.0, 2.0, [_row("j", 5e12)])
    led.close()
    # Make it look like a ledger written by schema 1 (no v2 indexes, no v3 gaps, no v4 columns,
    # user_version 1).
    con = sqlite3.connect(path)
    con.execute("DROP TABLE gaps")
    con.execute("ALTER TABLE job_totals DROP COLUMN hmma_flops")
    con.execute("ALTER TABLE job_totals DROP COLUMN half_rate_fraction")
    con.execute("DROP INDEX job_intervals_job_t0")
    con.execute("DROP INDEX job_events_kind")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    led = Ledger.open(path, clock=time.time, synchronous="NORMAL")
    try:
        assert led.verify().ok
        jobs = led.totals().jobs
        assert jobs  # data intact, and v4's HMMA column backfilled from the chain
        assert [(t.measured_flops, t.hmma_flops) for t in jobs.values()] == [(5e12, 5e12)]
        kinds = [k for (k,) in led._con.execute("SELECT kind FROM records ORDER BY seq")]
        assert kinds[-1] == "migration"
    finally:
        led.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    names = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"job_intervals_job_t0", "job_events_kind", "gaps_t1"} <= names
    con.close()


def test_sink_commit_cadence_and_final_commit_on_close(tmp_path: Path, clock: FakeClock) -> None:
    gpus = [GpuInfo("0", 0, "GPU-x", "H100", "hopper", 132)]
    totals = Totals(gpus)
    led = Ledger.open(tmp_path / "l.sqlite3", clock=clock, synchronous="NORMAL")
    sink = LedgerSink(led, clock=clock, commit_every_s=5.0)

    def commit(batch: Batch) -> None:  # what the pipeline does with each commit
        count_committed(totals, sink.commit(batch), 0)

    commit([(clock.t, clock.t + 0.5, [_row("j", 1e12)])])  # first commit: written
    assert sum(totals.snapshot().gpu_flops.values()) == 1e12
    for _ in range(4):
        clock.t += 0.5
        commit([(clock.t, clock.t + 0.5, [_row("j", 1e12)])])
    # Within the cadence: held back, and not counted until durable.
    assert sink.pending_intervals == 4
    assert sum(totals.snapshot().gpu_flops.values()) == 1e12
    clock.t += 5.0
    commit([])
    assert sink.pending_intervals == 0
    assert sum(totals.snapshot().gpu_flops.values()) == 5e12
    commit([(clock.t, clock.t + 0.5, [_row("j", 2e12)])])
    count_committed(totals, sink.close(), 0)  # commits what is pending before closing
    led = Ledger.open(tmp_path / "l.sqlite3", clock=time.time, readonly=True)
    try:
        assert sum(led.totals().gpu.values()) == 7e12
    finally:
        led.close()
