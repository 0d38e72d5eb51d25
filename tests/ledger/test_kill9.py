"""kill -9 at random moments: no counter goes backwards, at most one interval lost, chain ok."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import GpuKey
from gpuflops.ledger.store import Ledger

WRITER = Path(__file__).with_name("ledger_writer.py")
ROOT = Path(__file__).resolve().parents[2]


def _read_log(log: Path) -> tuple[dict[int, float], set[int]]:
    begun: dict[int, float] = {}
    committed: set[int] = set()
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[0] == "B":
            begun[int(parts[1])] = float(parts[2])
        elif parts[0] == "C":
            committed.add(int(parts[1]))
    return begun, committed


def _kill_runs(tmp_path: Path, runs: int, period_s: float, seed: int) -> list[int]:
    """Kill a writer ``runs`` times; returns per run 1 if the kill landed inside an append."""
    rng = random.Random(seed)
    path = tmp_path / "ledger.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    previous_gpu: dict[GpuKey, float] = {}
    previous_jobs: dict[str, float] = {}
    in_flight_per_run: list[int] = []
    seen_seqs: set[int] = set()
    for run in range(runs):
        log = tmp_path / f"run{run}.log"
        proc = subprocess.Popen([sys.executable, str(WRITER), str(path), str(log),
                                 str(period_s), str(run)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"READY\n"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        begun, committed = _read_log(log) if log.exists() else ({}, set())
        ledger = Ledger.open(path, clock=time.time)
        try:
            totals = ledger.totals()
            con_seqs = {s for s, in ledger._con.execute(
                "SELECT seq FROM records WHERE kind = 'interval'")}
        finally:
            ledger.close()
        mine = {s for s in con_seqs if s in begun}
        # Every interval whose commit returned is in the ledger.
        assert committed <= mine, f"run {run}: committed {committed - mine} missing"
        # Nothing in the ledger that no run tried to write (no phantom records).
        assert con_seqs - seen_seqs <= set(begun), f"run {run}: unexpected records"
        seen_seqs = con_seqs
        lost = len(set(begun) - mine)
        assert lost <= 1, f"run {run}: lost {lost} intervals"
        in_flight = len(set(begun) - committed)  # killed inside append_interval
        assert in_flight <= 1
        in_flight_per_run.append(in_flight)
        # Counters never go backwards and grew by exactly what this run committed.
        for key, value in previous_gpu.items():
            assert totals.gpu[key] >= value
        gained = sum(begun[s] for s in mine)
        key0 = GpuKey("0", "GPU-a", "hmma", "bf16")
        assert totals.gpu.get(key0, 0.0) == pytest.approx(previous_gpu.get(key0, 0.0) + gained,
                                                          rel=1e-12)
        shared = [t.measured_flops for k, t in totals.jobs.items() if k.job == "shared"]
        if previous_jobs.get("shared") is not None:
            assert shared[0] >= previous_jobs["shared"]
        previous_gpu = dict(totals.gpu)
        previous_jobs = {"shared": shared[0]} if shared else {}
        result = verify_path(path)
        assert result.ok, result
    return in_flight_per_run


@pytest.mark.slow
def test_kill9_during_100ms_sampling(tmp_path: Path) -> None:
    in_flight = _kill_runs(tmp_path, runs=50, period_s=0.1, seed=1234)
    assert len(in_flight) == 50


@pytest.mark.slow
def test_kill9_during_back_to_back_commits(tmp_path: Path) -> None:
    # No sleep between appends: most kills land inside a transaction.
    in_flight = _kill_runs(tmp_path, runs=12, period_s=0.0, seed=99)
    assert sum(in_flight) >= 6, "kills did not land inside appends; the test exercised nothing"
