"""Issue 13's durability and fail-open attacks against a real daemon: two daemons on one state
directory, a ledger of a newer schema, derived tables edited on disk, an edited chain, a ledger
locked at start, a full disk. Each must be refused or detected and lose nothing recorded."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.ledger.store import Ledger
from tests.app.trust_support import DaemonProcess, cleanup, short_tmp
from tests.jobs.jobsock_client import Client


def _records(d: DaemonProcess) -> list[tuple[int, str, dict[str, object]]]:
    con = sqlite3.connect(f"file:{d.state / LEDGER_FILENAME}?mode=ro", uri=True)
    try:
        return [(seq, kind, json.loads(c)) for seq, kind, c in
                con.execute("SELECT seq, kind, content FROM records ORDER BY seq")]
    finally:
        con.close()


def _gpu_total(d: DaemonProcess) -> float:
    m = d.metrics() or {}
    return sum(v for _lab, v in m.get("gpuflops_gpu_flops_total", []))


def _wait(pred: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_a_second_daemon_on_the_state_dir_names_the_first_and_writes_nothing(tmp: Path) -> None:
    first = DaemonProcess(tmp).wait_ready()
    try:
        _wait(lambda: _gpu_total(first) > 0)
        before = len(_records(first))
        second = DaemonProcess(tmp, env={})
        second.sock = tmp / "run" / "other.sock"
        assert second.wait() == 1
        assert f"is in use by process {first.proc.pid}" in second.output()
        # The first daemon keeps committing, and its chain stays whole.
        _wait(lambda: len(_records(first)) > before + 5)
        assert first.healthz()[0] == 200
    finally:
        first.stop()
    assert verify_path(first.state / LEDGER_FILENAME).ok


def test_a_ledger_of_a_newer_schema_stops_the_start_unless_no_ledger(tmp: Path) -> None:
    d = DaemonProcess(tmp).wait_ready()
    d.stop()
    con = sqlite3.connect(d.state / LEDGER_FILENAME)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    before = (d.state / LEDGER_FILENAME).read_bytes()
    refused = DaemonProcess(tmp)
    assert refused.wait() == 1
    out = refused.output()
    assert "schema version 99 is newer than this gpuflops" in out and "--no-ledger" in out
    assert (d.state / LEDGER_FILENAME).read_bytes() == before
    DaemonProcess(tmp, args=["--no-ledger"]).wait_ready().stop()


def test_derived_tables_edited_on_disk_are_rebuilt_from_the_chain_at_start(tmp: Path) -> None:
    d = DaemonProcess(tmp).wait_ready()
    _wait(lambda: _gpu_total(d) > 1e15)
    d.stop()
    truth = _gpu_total_on_disk(d)
    con = sqlite3.connect(d.state / LEDGER_FILENAME)
    con.execute("UPDATE gpu_totals SET flops = flops / 2")
    con.execute("UPDATE job_totals SET measured_flops = measured_flops / 2,"
                " first_t_s = first_t_s + 1.0")
    con.commit()
    con.close()
    assert verify_path(d.state / LEDGER_FILENAME).derived_only
    again = DaemonProcess(tmp).wait_ready()
    try:
        # The first export after the start is the chain's total, not the halved one.
        assert _gpu_total(again) >= truth
    finally:
        again.stop()
    assert "the derived tables were rebuilt from the hash chain" in again.output()
    starts = [c for _s, k, c in _records(again) if k == "session" and c["event"] == "start"]
    assert "derived table gpu_totals row" in str(starts[-1]["payload"]["rebuilt_derived"])
    assert verify_path(d.state / LEDGER_FILENAME).ok


def _gpu_total_on_disk(d: DaemonProcess) -> float:
    led = Ledger.open(d.state / LEDGER_FILENAME, clock=time.time, readonly=True)
    try:
        return sum(led.totals().gpu.values())
    finally:
        led.close()


def test_an_edited_chain_stops_the_start(tmp: Path) -> None:
    d = DaemonProcess(tmp).wait_ready()
    _wait(lambda: _gpu_total(d) > 0)
    d.stop()
    con = sqlite3.connect(d.state / LEDGER_FILENAME)
    seq, content = con.execute("SELECT seq, content FROM records WHERE kind = 'interval'"
                               " LIMIT 1").fetchone()
    con.execute("UPDATE records SET content = ? WHERE seq = ?",
                (content.replace('"rows":[[', '"rows":[ ['), seq))
    con.commit()
    con.close()
    refused = DaemonProcess(tmp)
    assert refused.wait() == 1
    assert f"fails verification at record {seq}: hash does not match" in refused.output()


def test_a_ledger_locked_at_start_still_gets_its_session_and_downtime_gap(tmp: Path) -> None:
    """Another process holds the ledger's write lock for 3 s while the daemon starts: the start
    waits for it; the session record and the downtime gap are written, not dropped."""
    d = DaemonProcess(tmp).wait_ready()
    d.stop()
    stopped = time.time()
    holder = subprocess.Popen(
        ["python3", "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1],"
         " isolation_level=None); c.execute('BEGIN IMMEDIATE'); print('locked', flush=True);"
         " time.sleep(3); c.execute('ROLLBACK')", str(d.state / LEDGER_FILENAME)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    again = DaemonProcess(tmp).wait_ready(timeout_s=30)
    again.stop()
    holder.wait()
    holder.stdout.close()
    kinds = [(k, c.get("event"), c.get("reason")) for _s, k, c in _records(again)]
    starts = [i for i, k in enumerate(kinds) if k == ("session", "start", None)]
    assert len(starts) == 2
    assert kinds[starts[1] - 1] == ("gap", None, "daemon_stopped")
    gap = [c for _s, k, c in _records(again) if k == "gap"][-1]
    assert gap["t0_s"] <= stopped and gap["t1_s"] >= stopped + 2.5


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_disk_fails_health_refuses_changes_and_recovers_in_order() -> None:
    """The state directory on a 2 MB tmpfs, filled while the daemon runs: /healthz fails and
    says why, gpuflops_ledger_writable drops to 0, changes are refused (not acknowledged), and
    once space returns the daemon recovers by itself: what waited is written in order, and the
    time the disk was full is covered by intervals."""
    tmp = short_tmp("gfd")
    mount = tmp / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    filler = mount / "filler"
    try:
        d = DaemonProcess(tmp, speed=1.0).wait_ready()
        with Client(str(d.sock)) as c:
            assert c.call(op="register", job="j", program="p")["ok"]
            for seq in range(1, 6):
                assert c.call(op="add", job="j", flops=1e9 * seq, tokens=1, client="c",
                              seq=seq)["ok"]
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            full_at = time.time()
            _wait(lambda: d.healthz()[0] == 503)
            _status, why = d.healthz()
            assert "ledger cannot write" in why
            m = d.metrics() or {}
            assert m["gpuflops_ledger_writable"][0][1] == 0.0
            refused = c.call(op="add", job="j", flops=6e9, tokens=1, client="c", seq=6)
            assert refused["error"] == "unavailable" and "nothing applied" in refused["detail"]
            time.sleep(2.0)
            filler.unlink()
            freed_at = time.time()
            _wait(lambda: d.healthz()[0] == 200)
            # The reporter's retry after the refusal: applied once, in order.
            assert c.call(op="add", job="j", flops=6e9, tokens=1, client="c", seq=6)["ok"]
            assert c.call(op="query", job="j")["job"]["analytic_flops"] == 21e9
        d.stop()
        recs = _records(d)
        seqs = [max(c["payload"]["clients"].values()) for _s, k, c in recs
                if k == "estimate" and c["payload"]["clients"]]
        assert seqs == sorted(seqs) and seqs[-1] == 6
        intervals = sorted((c["t0_s"], c["t1_s"]) for _s, k, c in recs if k == "interval")
        covered = [(a, b) for a, b in intervals if b > full_at and a < freed_at]
        assert covered, "the time the disk was full has no intervals"
        assert verify_path(d.state / LEDGER_FILENAME).ok
        led = Ledger.open(d.state / LEDGER_FILENAME, clock=time.time, readonly=True)
        try:
            assert led.totals().jobs[next(k for k in led.totals().jobs if k.job == "j")] \
                .analytic_flops == 21e9
        finally:
            led.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        cleanup(tmp)


def test_a_trace_with_an_impossible_clock_writes_gaps_not_flops(tmp: Path) -> None:
    """A replayed trace whose samples claim a 1e300 Hz SM clock once wrote 2.77e306 FLOPs."""
    from dataclasses import replace

    from gpuflops.sampler.trace import TraceWriter
    from tests.support import DEMO_TRACE, trace

    header, intervals, _events = trace(DEMO_TRACE)
    path = tmp / "bad.jsonl"
    writer = TraceWriter(path, list(header.gpus), header.interval_s, dict(header.meta))
    for i in intervals[:300]:
        writer.interval([replace(s, clock_hz=1e300) if s.clock_hz else s for s in i.samples])
    writer.close()
    d = DaemonProcess(tmp, replay=path, args=["--no-loop"])
    assert d.wait(60) == 0
    led = Ledger.open(d.state / LEDGER_FILENAME, clock=time.time, readonly=True)
    try:
        total = sum(led.totals().gpu.values())
        reasons = {g.reason for g in led.gaps()}
    finally:
        led.close()
    assert total == 0.0 and "implausible_clock" in reasons
