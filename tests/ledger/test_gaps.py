"""Unmeasured time in the ledger: gap and session records, written by the sink, in the chain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import NODE
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow
from tests.support import FakeClock, fake_gpus

GPUS = fake_gpus()


def _row(flops: float) -> FlopsRow:
    return FlopsRow("0", "GPU-a", "hmma", "bf16", "j", "p", 7, flops, "python")


def _sink(path: Path, clock: FakeClock) -> LedgerSink:
    led = Ledger.open(path, clock=clock, synchronous="NORMAL")
    return LedgerSink(led, clock=clock)


def _kinds(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [k for (k,) in con.execute("SELECT kind FROM records ORDER BY seq")]
    finally:
        con.close()


def test_gaps_are_chained_queried_by_time_and_verified(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    led = Ledger.open(path, clock=lambda: 0.0, synchronous="NORMAL")
    try:
        led.append_gap(10.0, 12.5, "gpm_read", [("0", "GPU-a")])
        led.append_gap(20.0, 30.0, "daemon_lost", [(NODE, "")])
        with pytest.raises(ValueError, match="bad gap"):
            led.append_gap(5.0, 4.0, "x", [("0", "GPU-a")])
        with pytest.raises(ValueError, match="reason"):
            led.append_gap(5.0, 6.0, "", [("0", "GPU-a")])
        with pytest.raises(ValueError, match="session event"):
            led.append_session("paused", 1.0, {})
        assert [(g.gpu, g.reason, g.duration_s) for g in led.gaps()] == [
            ("0", "gpm_read", 2.5), (NODE, "daemon_lost", 10.0)]
        assert [g.reason for g in led.gaps(12.6, 19.9)] == []
        assert [g.reason for g in led.gaps(11.0, 11.0)] == ["gpm_read"]
        assert led.verify().ok
    finally:
        led.close()
    # An edited gap is caught: by the hash, and by the derived table against the chain.
    con = sqlite3.connect(path)
    con.execute("UPDATE gaps SET t1_s = 11.0 WHERE reason = 'gpm_read'")
    con.commit()
    assert "derived table gaps" in (verify_path(path).reason or "")
    con.execute("UPDATE gaps SET t1_s = 12.5 WHERE reason = 'gpm_read'")
    seq, content = con.execute("SELECT seq, content FROM records WHERE kind = 'gap'").fetchone()
    obj = json.loads(content)
    obj["t1_s"] = 11.0
    con.execute("UPDATE records SET content = ? WHERE seq = ?",
                (json.dumps(obj, sort_keys=True, separators=(",", ":")), seq))
    con.commit()
    con.close()
    result = verify_path(path)
    assert not result.ok and result.first_bad_id == seq


def test_consecutive_sampler_gaps_become_one_record_when_the_gap_ends(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    path = tmp_path / "l.sqlite3"
    sink = _sink(path, clock)
    for i in range(6):  # 3 s of a lost GPU 1 while GPU 0 works
        t0 = 1000.0 + 0.5 * i
        sink.on_gap("1", "GPU-b", t0, t0 + 0.5, "gpu_lost")
        clock.t = t0 + 0.5
        sink.commit([(t0, t0 + 0.5, [_row(1e12)])])
    assert sink.ledger is not None
    assert sink.ledger.gaps() == []  # still open
    clock.t += 0.5
    sink.commit([(clock.t - 0.5, clock.t, [_row(1e12)])])  # GPU 1 measured again
    (gap,) = sink.ledger.gaps()
    assert (gap.gpu, gap.uuid, gap.t0_s, gap.t1_s, gap.reason) == (
        "1", "GPU-b", 1000.0, 1003.0, "gpu_lost")
    # A new gap after measured time is a new record; a different reason is a separate span.
    sink.on_gap("1", "GPU-b", 1010.0, 1010.5, "gpu_lost")
    sink.on_gap("1", "GPU-b", 1010.0, 1010.5, "timeout")
    sink.on_gap("1", "GPU-b", 1020.0, 1020.5, "gpu_lost")  # not contiguous: closes 1010's span
    sink.close()
    led = Ledger.open(path, clock=clock, readonly=True)
    try:
        assert sorted((g.t0_s, g.reason) for g in led.gaps()) == [
            (1000.0, "gpu_lost"), (1010.0, "gpu_lost"), (1010.0, "timeout"), (1020.0, "gpu_lost")]
    finally:
        led.close()
    assert verify_path(path).ok


def test_a_long_gap_is_written_in_pieces_so_a_crash_loses_little_of_it(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    sink = _sink(tmp_path / "l.sqlite3", clock)
    for i in range(300):  # 150 s lost
        sink.on_gap("0", "GPU-a", 0.5 * i, 0.5 * i + 0.5, "gpm_read")
        clock.t = 0.5 * i + 0.5
        sink.commit([])
    assert sink.ledger is not None
    pieces = sink.ledger.gaps()
    assert [(g.t0_s, g.t1_s) for g in pieces] == [(0.0, 60.0), (60.0, 120.0)]  # 30 s still open


def test_restarts_record_the_time_no_daemon_measured(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    path = tmp_path / "l.sqlite3"
    gpus = [(g.key, g.uuid) for g in GPUS]
    sink = _sink(path, clock)
    sink.start_session({"version": "t"}, gpus)  # a new ledger: nothing before it
    clock.t = 101.0
    sink.commit([(100.5, 101.0, [_row(1e12)])])
    clock.t = 105.0
    sink.close()  # clean stop at 105
    clock.t = 200.0
    sink = _sink(path, clock)
    sink.start_session({"version": "t"}, gpus)
    clock.t = 201.0
    sink.commit([(200.5, 201.0, [_row(1e12)])])
    assert sink.ledger is not None
    sink.ledger.close()  # killed: no stop record
    clock.t = 300.0
    sink = _sink(path, clock)
    sink.start_session({"version": "t"}, gpus)
    assert sink.ledger is not None
    gaps = [(g.gpu, g.t0_s, g.t1_s, g.reason) for g in sink.ledger.gaps()]
    assert gaps == [(NODE, 105.0, 200.0, "daemon_stopped"), (NODE, 201.0, 300.0, "daemon_lost")]
    sink.close()
    kinds = _kinds(path)
    assert kinds.count("session") == 5  # start, stop, start, start, stop
    assert verify_path(path).ok


def test_an_idle_daemon_leaves_alive_records_that_bound_a_crash(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    path = tmp_path / "l.sqlite3"
    sink = _sink(path, clock)
    sink.start_session({}, [("0", "GPU-a")])
    for t in range(1, 200):  # idle: nothing but commits of empty intervals
        clock.t = float(t)
        sink.commit([])
    assert sink.ledger is not None
    sink.ledger.close()  # crash at 199 s
    assert _kinds(path).count("session") == 1 + 3  # start, alive at 60, 120, 180
    clock.t = 400.0
    sink = _sink(path, clock)
    sink.start_session({}, [("0", "GPU-a")])
    assert sink.ledger is not None
    (gap,) = sink.ledger.gaps()
    assert (gap.t0_s, gap.reason) == (180.0, "daemon_lost")  # not from the start at 0 s
    sink.close()


def test_an_archived_schema_2_ledger_is_read_as_it_is(tmp_path: Path) -> None:
    """Evidence is not migrated: a ledger from before gap records opens read-only, unchanged,
    verifies, and reads as having no gaps; opened for writing it is migrated in the chain."""
    path = tmp_path / "l.sqlite3"
    led = Ledger.open(path, clock=lambda: 0.0, synchronous="NORMAL")
    led.append_interval(1.0, 2.0, [_row(5e12)])
    led.close()
    con = sqlite3.connect(path)
    con.execute("DROP TABLE gaps")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    before = path.read_bytes()
    ro = Ledger.open(path, clock=lambda: 0.0, readonly=True)
    try:
        assert ro.gaps() == [] and sum(ro.totals().gpu.values()) == 5e12
        last = ro.last_activity()
        assert last is not None and (last.t_s, last.clean_stop) == (2.0, False)
    finally:
        ro.close()
    assert verify_path(path).ok
    assert path.read_bytes() == before
    rw = Ledger.open(path, clock=lambda: 3.0, synchronous="NORMAL")
    try:
        rw.append_gap(2.0, 3.0, "daemon_lost", [(NODE, "")])
        assert [g.reason for g in rw.gaps()] == ["daemon_lost"]
        assert rw.verify().ok
    finally:
        rw.close()
    assert _kinds(path)[-2:] == ["migration", "gap"]
