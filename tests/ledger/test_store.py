"""The SQLite hash-chained ledger on real files: totals, restarts, tampering, corruption."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import GpuKey, JobKey, LedgerCorruptError, LedgerVersionError
from gpuflops.ledger.store import Ledger, open_or_quarantine
from gpuflops.model import FlopsRow
from tests.support import FakeClock

ROOT = Path(__file__).resolve().parents[2]


T0 = 1_750_000_000.0


def rows(i: int) -> list[FlopsRow]:
    return [FlopsRow("0", "GPU-a", "hmma", "bf16", "j1", "p", 10, 1e12 * (i + 1)),
            FlopsRow("1", "GPU-b", "fp32", "fp32", "j2", "p", 11, 5e11),
            FlopsRow("1", "GPU-b", "hmma", "bf16", "j2", "p", 11, 0.0)]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger.open(path, clock=FakeClock(T0))
    ledger.append_job_event("register", "j1", "p", {"attempt": 1, "model": "m"}, 1.0)
    for i in range(8):
        ledger.append_interval(10.0 + i, 11.0 + i, rows(i))
    ledger.append_job_event("estimate", "j1", "p", {"analytic_flops": 3e13, "tokens": 1e4,
                                                    "recompute_flops": 0.0,
                                                    "window_t0_s": 10.0, "window_t1_s": 18.0},
                            18.5)
    ledger.close()
    yield path


def test_totals_persist_across_reopen(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path, clock=FakeClock(T0))
    t = ledger.totals()
    assert t.gpu[GpuKey("0", "GPU-a", "hmma", "bf16")] == pytest.approx(36e12)
    assert t.gpu[GpuKey("1", "GPU-b", "fp32", "fp32")] == pytest.approx(4e12)
    assert GpuKey("1", "GPU-b", "hmma", "bf16") not in t.gpu  # zero rows are not stored
    j1 = t.jobs[JobKey("j1", "p")]
    assert (j1.measured_flops, j1.analytic_flops, j1.tokens) == pytest.approx((36e12, 3e13, 1e4))
    assert t.records == 1 + 1 + 8 + 1
    ledger.append_interval(20.0, 21.0, rows(0))
    assert ledger.totals().gpu[GpuKey("0", "GPU-a", "hmma", "bf16")] == pytest.approx(37e12)
    assert ledger.matched_measured("j1", "p", 10.0, 12.5) == pytest.approx(1e12 + 2e12 + 1.5e12)
    assert [e.kind for e in ledger.job_events("p")] == ["register", "estimate"]
    ledger.close()
    assert verify_path(ledger_path).ok


def test_empty_interval_writes_nothing_and_bad_values_are_refused(ledger_path: Path) -> None:
    ledger = Ledger.open(ledger_path, clock=FakeClock(T0))
    head = ledger.head()
    assert ledger.append_interval(30.0, 31.0, []) is None
    with pytest.raises(ValueError):
        ledger.append_interval(30.0, 31.0, [FlopsRow("0", "u", "hmma", "bf16", "j", "p", None,
                                                     float("nan"))])
    with pytest.raises(ValueError):
        ledger.append_interval(31.0, 30.0, rows(0))
    with pytest.raises(ValueError):
        ledger.append_job_event("register", "j", "p", {"x": float("inf")}, 1.0)
    with pytest.raises(ValueError):
        ledger.append_job_event("bogus", "j", "p", {}, 1.0)
    assert ledger.head() == head
    ledger.close()
    assert verify_path(ledger_path).ok


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def _bad(path: Path) -> tuple[int | None, str]:
    result = verify_path(path)
    assert not result.ok
    assert result.reason
    return result.first_bad_id, result.reason


def test_edit_of_any_record_is_detected(ledger_path: Path) -> None:
    for seq in (1, 2, 5, 11):
        con = _raw(ledger_path)
        (content,) = con.execute("SELECT content FROM records WHERE seq = ?", (seq,)).fetchone()
        obj = json.loads(content)
        obj["t_s" if "t_s" in obj else "t0_s"] = 0.5
        con.execute("UPDATE records SET content = ? WHERE seq = ?", (json.dumps(obj), seq))
        con.close()
        assert _bad(ledger_path)[0] == seq
        con = _raw(ledger_path)
        con.execute("UPDATE records SET content = ? WHERE seq = ?", (content, seq))
        con.close()
        assert verify_path(ledger_path).ok


def test_edit_with_recomputed_hash_is_detected_at_the_next_record(ledger_path: Path) -> None:
    from gpuflops.ledger.chain import canonical_json, record_hash
    con = _raw(ledger_path)
    content, prev = con.execute("SELECT content, prev_hash FROM records WHERE seq = 4").fetchone()
    obj = json.loads(content)
    obj["rows"][0][7] = 1.0  # shrink the FLOPs
    new = canonical_json(obj)
    con.execute("UPDATE records SET content = ?, hash = ? WHERE seq = 4",
                (new, record_hash(prev, new)))
    con.close()
    assert _bad(ledger_path)[0] == 5


def test_deleting_a_middle_record_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    con.execute("DELETE FROM records WHERE seq = 6")
    con.close()
    first, reason = _bad(ledger_path)
    assert first == 6 and "missing" in reason


def test_deleting_the_last_record_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    con.execute("DELETE FROM records WHERE seq = (SELECT max(seq) FROM records)")
    con.close()
    first, reason = _bad(ledger_path)
    assert first == 11 and "chain_head" in reason
    with pytest.raises(LedgerCorruptError):
        Ledger.open(ledger_path, clock=FakeClock(T0))


def test_deleting_the_first_record_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    con.execute("DELETE FROM records WHERE seq = 1")
    con.close()
    assert _bad(ledger_path)[0] == 1


def test_reordering_two_records_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    a = con.execute("SELECT kind, content, prev_hash, hash FROM records WHERE seq = 4").fetchone()
    b = con.execute("SELECT kind, content, prev_hash, hash FROM records WHERE seq = 5").fetchone()
    con.execute("BEGIN")
    con.execute("UPDATE records SET kind=?, content=?, prev_hash=?, hash=? WHERE seq = 4", b)
    con.execute("UPDATE records SET kind=?, content=?, prev_hash=?, hash=? WHERE seq = 5", a)
    con.execute("COMMIT")
    con.close()
    assert _bad(ledger_path)[0] == 4


def test_renumbering_records_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    con.execute("DELETE FROM records WHERE seq = 6")
    con.execute("UPDATE records SET seq = seq - 1 WHERE seq > 6")
    con.execute("UPDATE chain_head SET seq = seq - 1")
    con.close()
    assert _bad(ledger_path)[0] == 6


def test_editing_a_derived_total_is_detected(ledger_path: Path) -> None:
    con = _raw(ledger_path)
    con.execute("UPDATE gpu_totals SET flops = flops / 2 WHERE gpu = '0'")
    con.close()
    first, reason = _bad(ledger_path)
    assert first is None and "gpu_totals" in reason


def test_verify_cli_names_the_first_bad_record(ledger_path: Path) -> None:
    cmd = [sys.executable, "-c", "from gpuflops.cli.verify import verify_command; "
           "verify_command()", "--state-dir", str(ledger_path.parent)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 11 records" in ok.stdout
    con = _raw(ledger_path)
    con.execute("UPDATE records SET content = replace(content, '\"j1\"', '\"jX\"') WHERE seq = 3")
    con.close()
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 1
    assert "record 3" in bad.stderr


def test_corrupt_file_is_refused_then_quarantined_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    garbage = b"this is not an SQLite database\x00" * 100
    path.write_bytes(garbage)
    with pytest.raises(LedgerCorruptError):
        Ledger.open(path, clock=FakeClock(T0))
    assert path.read_bytes() == garbage  # not overwritten
    assert not verify_path(path).ok
    ledger, moved = open_or_quarantine(path, clock=FakeClock(T0))
    assert moved is not None and moved.read_bytes() == garbage
    ledger.append_interval(1.0, 2.0, rows(0))
    ledger.close()
    result = verify_path(path)
    assert result.ok and result.records == 3  # genesis, quarantine note, interval


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger.open(path, clock=FakeClock(T0)).close()
    con = _raw(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(LedgerVersionError):
        Ledger.open(path, clock=FakeClock(T0))
    with pytest.raises(LedgerVersionError):
        open_or_quarantine(path, clock=FakeClock(T0))
    assert path.exists()


def test_readonly_open_does_not_create(tmp_path: Path) -> None:
    from gpuflops.ledger.records import LedgerError
    with pytest.raises(LedgerError):
        Ledger.open(tmp_path / "none.sqlite3", clock=FakeClock(T0), readonly=True)
    assert not (tmp_path / "none.sqlite3").exists()
