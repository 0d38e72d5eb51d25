"""kill -9 the real daemon at random moments, 50 times: counters never go backwards, the ledger
verifies, and what was exported before each kill was already durable.

The daemon replays the H100 trace at 20x speed (a sampling interval every 5 ms of wall time,
so a kill lands mid-interval or mid-commit often), with a real ledger and job socket.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.ledger.store import Ledger

ROOT = Path(__file__).resolve().parents[2]
COUNTERS = ("gpuflops_gpu_flops_total", "gpuflops_job_measured_flops_total")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in COUNTERS:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _start(port: int, state: Path, sock: Path, speed: float = 20.0) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "gpuflops", "daemon", "--demo", "--speed", str(speed),
         "--listen", f"127.0.0.1:{port}", "--socket", str(sock), "--state-dir", str(state)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_fifty_kill9_never_lose_counters_or_chain() -> None:
    rng = random.Random(20261122)
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="gf9-"))
    state, sock = tmp / "state", tmp / "s.sock"
    port = _free_port()
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    kills_with_data = 0
    for _round in range(50):
        p = _start(port, state, sock)
        try:
            first = None
            deadline = time.monotonic() + 20
            while first is None and time.monotonic() < deadline:
                first = _scrape(port)
                if first is None:
                    time.sleep(0.05)
            assert first is not None, "daemon did not come up"
            # The first scrape after a restart comes from the ledger: never below the last one
            # exported before the kill.
            for key, value in last.items():
                assert first.get(key, 0.0) >= value, f"{key} went back: {value} -> {first.get(key)}"
            last = first
            stop_at = time.monotonic() + rng.uniform(0.05, 0.8)
            while time.monotonic() < stop_at:
                now = _scrape(port)
                if now is not None:
                    for key, value in last.items():
                        assert now.get(key, 0.0) >= value
                    last = now
            kills_with_data += bool(last)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
    assert kills_with_data >= 45
    result = verify_path(state / LEDGER_FILENAME)
    assert result.ok, result.reason
    led = Ledger.open(state / LEDGER_FILENAME, clock=time.time, readonly=True)
    try:
        durable = sum(led.totals().gpu.values())
    finally:
        led.close()
    exported = sum(v for (name, _l), v in last.items() if name == "gpuflops_gpu_flops_total")
    # Everything exported was durable when it was exported.
    assert durable >= exported > 0


def _session(port: int, state: Path, sock: Path, up_s: float, sig: signal.Signals) -> float:
    """Run the daemon at real speed for ``up_s`` after it answers, end it with ``sig``; return
    when it ended. A SIGTERM must end it cleanly."""
    p = _start(port, state, sock, speed=1.0)
    try:
        deadline = time.monotonic() + 20
        while _scrape(port) is None:
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.05)
        time.sleep(up_s)
    finally:
        p.send_signal(sig)
        code = p.wait(timeout=20)
    if sig == signal.SIGTERM:
        assert code == 0
    return time.time()


@pytest.mark.slow
def test_restarts_leave_the_unmetered_time_in_the_ledger() -> None:
    """Killed, then stopped cleanly, then started again: the ledger holds one node-wide gap per
    restart, ``daemon_lost`` from the killed session's last record and ``daemon_stopped`` from
    the clean stop, each ending at the next session's start."""
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="gfr-"))
    state, sock = tmp / "state", tmp / "s.sock"
    port = _free_port()
    killed_at = _session(port, state, sock, 1.5, signal.SIGKILL)
    time.sleep(1.0)
    stopped_at = _session(port, state, sock, 1.0, signal.SIGTERM)
    time.sleep(1.0)
    _session(port, state, sock, 0.0, signal.SIGTERM)
    assert verify_path(state / LEDGER_FILENAME).ok
    led = Ledger.open(state / LEDGER_FILENAME, clock=time.time, readonly=True)
    try:
        gaps = [g for g in led.gaps() if g.gpu == "*"]
    finally:
        led.close()
    assert [g.reason for g in gaps] == ["daemon_lost", "daemon_stopped"]
    lost, stopped = gaps
    # The killed session's last record came at most one commit before the kill.
    assert killed_at - 2.0 <= lost.t0_s <= killed_at and lost.t1_s > killed_at + 0.9
    assert stopped_at - 2.0 <= stopped.t0_s <= stopped_at and stopped.t1_s > stopped_at + 0.9
