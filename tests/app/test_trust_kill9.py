"""kill -9 a real daemon 32 times, most of them while two processes share the GPU (intervals
held for attribution), while a client reports analytic work: zero acknowledged work lost, zero
unrecorded time, zero counter regressions.

The trace is the demo's own recording, cut to its busy parts: 6 s of the shared-GPU phase, then
3 s of a single process, retimed back to back and replayed in a loop at real speed (so sample
times are wall times and downtime gaps mean what they say). Every interval of it has work, so
any span of the GPU's time with neither an interval nor a gap record is time the ledger lost.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.model import GpuSample, ProcessUtilSample
from gpuflops.sampler.trace import TraceInterval, TraceWriter
from tests.app.trust_support import DaemonProcess, cleanup, short_tmp
from tests.support import DEMO_TRACE, trace

SHARED = (106.31, 112.31)  # trace seconds: processes 1470 and 1471 share the H100
SINGLE = (87.51, 90.51)  # process 458 alone
COUNTERS = ("gpuflops_gpu_flops_total", "gpuflops_job_measured_flops_total",
            "gpuflops_job_analytic_flops_total")


def _busy_trace(path: Path) -> float:
    """Write the cut trace; returns its length in seconds."""
    header, intervals, _events = trace(DEMO_TRACE)
    origin = intervals[0].t0_s
    out: list[TraceInterval] = []
    t = 0.0
    for a, b in (SHARED, SINGLE):
        block = [i for i in intervals if origin + a - 0.01 <= i.t0_s and i.t1_s <= origin + b]
        shift = t - (block[0].t0_s - origin)
        for i in block:
            out.append(_retimed(i, shift))
        t = out[-1].t1_s - origin
    writer = TraceWriter(path, list(header.gpus), header.interval_s, dict(header.meta))
    for i in out:
        writer.interval(list(i.samples))
    writer.close()
    return t


def _retimed(i: TraceInterval, shift: float) -> TraceInterval:
    def sample(s: GpuSample) -> GpuSample:
        return replace(s, t0_s=s.t0_s + shift, t1_s=s.t1_s + shift,
                       process_util=tuple(ProcessUtilSample(u.pid, u.timestamp_s + shift,
                                                            u.sm_util) for u in s.process_util))
    return replace(i, t0_s=i.t0_s + shift, t1_s=i.t1_s + shift,
                   samples=tuple(sample(s) for s in i.samples))


class Reporter(threading.Thread):
    """Adds with client/seq, one at a time; what the daemon acknowledged is what counts.
    After a lost connection it reconnects, registers and resends the same seq."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.acked: dict[int, float] = {}
        self.seq = 1
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5.0)
                    s.connect(str(self.sock))
                    f = s.makefile("rwb")
                    self._call(f, {"op": "register", "job": "k9", "program": "k9p"})
                    while not self.stop.is_set():
                        amount = 1e9 * (self.seq % 7 + 1)
                        r = self._call(f, {"op": "add", "job": "k9", "flops": amount,
                                           "tokens": 1, "client": "c", "seq": self.seq})
                        if r.get("ok"):
                            self.acked[self.seq] = amount
                            self.seq += 1
                        time.sleep(0.01)
            except (OSError, ValueError):
                time.sleep(0.05)

    @staticmethod
    def _call(f: object, msg: dict[str, object]) -> dict[str, object]:
        f.write(json.dumps({"v": 1, **msg}).encode() + b"\n")  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise OSError("closed")
        reply: dict[str, object] = json.loads(line)
        return reply


def _counters(d: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    m = d.metrics()
    if m is None:
        return None
    return {(name, tuple(sorted(lab.items()))): v for name in COUNTERS
            for lab, v in m.get(name, [])}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_loses_no_acknowledged_work_no_time_and_no_counter() -> None:
    rng = random.Random(13)
    tmp = short_tmp("gfk")
    try:
        span = _busy_trace(tmp / "busy.jsonl")
        shared_s = SHARED[1] - SHARED[0]
        reporter = None
        last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        in_shared = 0
        for _round in range(32):
            d = DaemonProcess(tmp, replay=tmp / "busy.jsonl", speed=1.0).wait_ready()
            up_at = time.monotonic()
            first = _counters(d)
            assert first is not None
            for key, value in last.items():  # restored from the ledger: never below
                assert first.get(key, 0.0) >= value, f"{key} went back: {value} -> {first.get(key)}"
            last = first
            if reporter is None:
                reporter = Reporter(d.sock)
                reporter.start()
            uptime = rng.uniform(0.3, 8.7)
            while time.monotonic() - up_at < uptime:
                now = _counters(d)
                if now is not None:
                    for key, value in last.items():
                        assert now.get(key, 0.0) >= value
                    last = now
                time.sleep(0.1)
            in_shared += (time.monotonic() - up_at) % span < shared_s
            d.stop(signal.SIGKILL)
        final = DaemonProcess(tmp, replay=tmp / "busy.jsonl", speed=1.0).wait_ready()
        assert reporter is not None
        sent = reporter.seq
        deadline = time.monotonic() + 20
        while reporter.seq <= sent + 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the in-flight add of the last kill is resent and answered
        reporter.stop.set()
        reporter.join(10)
        assert final.stop() == 0
        assert in_shared >= 10
        ledger = final.state / LEDGER_FILENAME
        assert verify_path(ledger).ok
        _check(ledger, reporter.acked)
    finally:
        cleanup(tmp)


def _check(ledger: Path, acked: dict[int, float]) -> None:
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        analytic = con.execute("SELECT analytic_flops FROM job_totals WHERE job = 'k9'"
                               ).fetchone()[0]
        records = [(k, json.loads(c)) for k, c in
                   con.execute("SELECT kind, content FROM records ORDER BY seq")]
    finally:
        con.close()
    # Every acknowledged add is in the ledger, once (resends are recognised by their seq).
    assert analytic == pytest.approx(sum(acked.values()), rel=1e-12)
    assert len(acked) > 100
    spans = [(c["t0_s"], c["t1_s"]) for k, c in records if k == "interval"]
    spans += [(c["t0_s"], c["t1_s"]) for k, c in records
              if k == "gap" and any(g in ("0", "*") for g, _u in c["gpus"])]
    spans.sort()
    start = spans[0][0]
    reach = spans[0][1]
    holes = []
    for a, b in spans[1:]:
        if a > reach + 0.05:
            holes.append((round(a - start, 2), round(a - reach, 3)))
        reach = max(reach, b)
    stop = max(c["t_s"] for k, c in records if k == "session" and c["event"] == "stop")
    assert reach >= stop - 3.5  # the last held intervals are flushed at the clean stop
    # Every moment of the GPU's busy time has an interval or a gap record.
    assert holes == []
    lost = [c for k, c in records if k == "gap" and c["reason"] == "daemon_lost"]
    assert len(lost) == 32
