"""Issue 13's denial-of-service attacks against a real daemon: one user holding every connection,
filling the job table and /metrics, an add flood, program evaluation stalling the sampling loop.
Each must be bounded per user, and leave other users and the sampling loop unaffected."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflops.compliance.programs import ProgramEvaluator
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow
from tests.app.trust_support import (
    GROUP,
    SYSTEM_PYTHON,
    DaemonProcess,
    LocalUsers,
    as_user,
)


@pytest.fixture(scope="module")
def users() -> Iterator[LocalUsers]:
    if os.geteuid() != 0:
        pytest.skip("creates users; CI runs as root")
    u = LocalUsers()
    yield u
    u.close()




HOARDER = r"""
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
conns, first = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(path)
    f = s.makefile("rwb")
    try:
        f.write(b'{"v":1,"op":"ping"}\n'); f.flush()
    except BrokenPipeError:
        pass  # refused at once: the reason is already waiting to be read
    first.append(json.loads(f.readline()))
    conns.append(f)
print(json.dumps(first), flush=True)
sys.stdin.readline()  # hold them until the test has tried another user
closed = []
for f in conns[:64]:
    line = f.readline()  # the idle notice, then end of file
    closed.append([json.loads(line).get("error") if line else None, f.readline() == b""])
print(json.dumps(closed), flush=True)
"""


def test_one_user_cannot_hold_every_connection_and_idle_ones_are_closed(users: LocalUsers,
                                                                        tmp: Path) -> None:
    d = DaemonProcess(tmp, args=["--socket-group", GROUP],
                      env={"GPUFLOPS_SOCKET_IDLE_S": "3"}).wait_ready()
    alice = users["alice"]
    hoarder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", HOARDER, str(d.sock), "70"], user=alice.uid, group=alice.gid,
        extra_groups=users.groups(alice), cwd="/", env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hoarder.stdout is not None and hoarder.stdin is not None
        first = json.loads(hoarder.stdout.readline())
        assert [r.get("ok") for r in first[:64]] == [True] * 64
        assert {r.get("error") for r in first[64:]} == {"too_many_connections"}
        assert f"uid {alice.uid} has 64 connections open" in first[64]["detail"]
        # Another user is not locked out.
        assert as_user(users, "bob", d.sock, [{"op": "ping"}])[0]["ok"]
        hoarder.stdin.write("\n")
        hoarder.stdin.flush()
        closed = json.loads(hoarder.stdout.readline())
        assert closed == [["idle", True]] * 64
        hoarder.wait(10)
    finally:
        hoarder.kill()
        hoarder.wait()
        for pipe in (hoarder.stdin, hoarder.stdout):
            if pipe is not None:
                pipe.close()
        d.stop()


def test_one_user_cannot_fill_the_job_table_or_the_metrics(users: LocalUsers, tmp: Path) -> None:
    d = DaemonProcess(tmp, args=["--socket-group", GROUP]).wait_ready()
    try:
        flood = [m for i in range(300) for m in (
            {"op": "register", "job": f"flood-{i}", "program": f"flood-{i}"},
            {"op": "add", "job": f"flood-{i}", "flops": 1e9, "tokens": 1})]
        replies = as_user(users, "alice", d.sock, flood)
        registered = [r.get("error") for r in replies[0::2]]
        assert registered[:256] == [None] * 256 and set(registered[256:]) == {"limit"}
        assert "has 256 jobs open (the per-user limit)" in replies[512]["detail"]
        bob = as_user(users, "bob", d.sock, [{"op": "register", "job": "bob-1",
                                              "program": "bob-prog"}])
        assert bob[0]["ok"]
        time.sleep(1.0)
        t0 = time.monotonic()
        m = d.metrics() or {}
        scrape_s = time.monotonic() - t0
        jobs = {lab["job_id"] for lab, _v in m.get("gpuflops_job_analytic_flops_total", [])}
        series = sum(len(v) for v in m.values())
        assert len(jobs) == 256 and series < 3000 and scrape_s < 1.0
    finally:
        d.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_add_flood_leaves_memory_bounded(tmp: Path) -> None:
    """300,000 adds from 16 connections as fast as the daemon takes them (each process's
    reports kept for shared-GPU splits): resident memory stays within 40 MB of where it was."""
    d = DaemonProcess(tmp).wait_ready()
    try:
        time.sleep(1.0)
        before = _rss_mb(d.proc.pid)
        conns = []
        for i in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.sock))
            f = s.makefile("rwb")
            f.write(json.dumps({"v": 1, "op": "register", "job": f"f{i}", "program": "fp"}
                               ).encode() + b"\n")
            f.flush()
            assert json.loads(f.readline())["ok"]
            conns.append((s, f, (json.dumps({"v": 1, "op": "add", "job": f"f{i}", "flops": 1e6,
                                             "tokens": 1}).encode() + b"\n") * 250))
        peak = before
        for _round in range(75):
            for s, _f, burst in conns:
                s.sendall(burst)
            for _s, f, _b in conns:
                for _ in range(250):
                    assert f.readline() == b'{"ok":true}\n'
            peak = max(peak, _rss_mb(d.proc.pid))
        for s, f, _b in conns:
            f.close()
            s.close()
        time.sleep(2.0)
        after = _rss_mb(d.proc.pid)
        assert peak - before < 40 and after - before < 40, (before, peak, after)
    finally:
        d.stop()


def test_program_evaluation_follows_the_programs_that_changed(tmp: Path) -> None:
    """2,000 programs: the first pass evaluates them all; after one program's job runs again,
    a pass evaluates that one only, whatever the number of programs."""
    ledger = Ledger.open(tmp / "l.sqlite3", clock=time.time, synchronous="NORMAL")
    try:
        for i in range(2000):
            ledger.append_interval(1.0 + i, 2.0 + i, [FlopsRow("0", "GPU-a", "hmma", "bf16",
                                                               f"j{i}", f"p{i}", 7, 1e12)])
        ev = ProgramEvaluator(ledger, ProgramsConfig(), period_s=1.0)
        ev.refresh()
        assert ev.evaluated == 2000 and len(ev.view.statuses) == 2000
        ev.refresh()
        assert ev.evaluated == 2000  # nothing changed: nothing evaluated
        ledger.append_interval(5000.0, 5001.0, [FlopsRow("0", "GPU-a", "hmma", "bf16", "j7",
                                                         "p7", 7, 1e12)])
        t0 = time.perf_counter()
        ev.refresh()
        assert ev.evaluated == 2001 and time.perf_counter() - t0 < 0.5
        assert ev.view.statuses["p7"].flops_by_basis["measured"] == 2e12
        assert len(ev.view.statuses) == 2000
    finally:
        ledger.close()


def test_many_programs_do_not_stall_sampling(tmp: Path) -> None:
    """1,500 programs with work, evaluated every second: the sampling loop keeps its pace and
    /healthz never fails."""
    d = DaemonProcess(tmp, env={"GPUFLOPS_PROGRAM_REFRESH_S": "1"}).wait_ready()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.sock))
            f = s.makefile("rwb")
            for i in range(1500):  # root: not held to the per-user job limit
                f.write(json.dumps({"v": 1, "op": "register", "job": f"j{i}",
                                    "program": f"p{i}"}).encode() + b"\n")
                f.write(json.dumps({"v": 1, "op": "add", "job": f"j{i}", "flops": 1e9,
                                    "tokens": 1}).encode() + b"\n")
            f.flush()
            assert all(json.loads(f.readline())["ok"] for _ in range(3000))
        started = time.monotonic()
        programs: set[str] = set()
        # Until every program has been evaluated, and a few seconds of re-evaluations more.
        while len(programs) < 1500 or time.monotonic() - started < 8:
            assert time.monotonic() - started < 60, f"{len(programs)} programs evaluated"
            assert d.healthz()[0] == 200
            m = d.metrics() or {}
            last = max(v for _l, v in m["gpuflops_sampler_last_sample_timestamp_seconds"])
            programs = {lab["program"] for lab, _v in m.get("gpuflops_program_flops_total", [])}
            # At 20x replay speed sample times run ahead of the clock, never behind it.
            assert last > time.time() - 3.0
            time.sleep(0.5)
    finally:
        d.stop()
