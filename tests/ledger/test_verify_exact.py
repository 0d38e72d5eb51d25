"""Issue 13's verify holes, on a ledger a real daemon wrote: moving any time in a derived table,
by a second or a millisecond, is detected (no relative tolerance on Unix times), and so is any
change to the owner tables."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflops.ledger.records import LEDGER_FILENAME
from tests.app.trust_support import DaemonProcess, cleanup, short_tmp
from tests.jobs.jobsock_client import Client
from tests.support import ROOT


@pytest.fixture(scope="module")
def written() -> Iterator[Path]:
    """A ledger with intervals, estimates, events, owners, reporters and gaps."""
    tmp = short_tmp("gfv")
    d = DaemonProcess(tmp).wait_ready()
    try:
        with Client(str(d.sock)) as c:
            assert c.call(op="register", job="j", program="p")["ok"]
            for seq in range(1, 4):
                assert c.call(op="add", job="j", flops=1e12, tokens=8, client="c", seq=seq)["ok"]
                time.sleep(0.2)
            assert c.call(op="end", job="j", final=True)["ok"]
        time.sleep(0.5)
    finally:
        d.stop()
    DaemonProcess(tmp).wait_ready().stop()  # a second session: a downtime gap
    yield d.state / LEDGER_FILENAME
    cleanup(tmp)


TAMPERING = {
    "estimate window start": "UPDATE job_totals SET estimate_t0_s = estimate_t0_s + 1.0"
                             " WHERE job = 'j'",
    "estimate window end": "UPDATE job_totals SET estimate_t1_s = estimate_t1_s - 0.001"
                           " WHERE job = 'j'",
    "a job's first time": "UPDATE job_totals SET first_t_s = first_t_s - 1.0",
    "a job's last time": "UPDATE job_totals SET last_t_s = last_t_s + 0.001",
    "an interval's start": "UPDATE job_intervals SET t0_s = t0_s + 1.0"
                           " WHERE seq = (SELECT min(seq) FROM job_intervals)",
    "an interval's end": "UPDATE job_intervals SET t1_s = t1_s + 0.001"
                         " WHERE seq = (SELECT max(seq) FROM job_intervals)",
    "an event's time": "UPDATE job_events SET t_s = t_s + 1.0"
                       " WHERE seq = (SELECT min(seq) FROM job_events)",
    "a gap moved 1.8 s": "UPDATE gaps SET t0_s = t0_s + 1.8, t1_s = t1_s + 1.8",
    "a gap moved 1 ms": "UPDATE gaps SET t1_s = t1_s + 0.001",
    "a job's owner": "UPDATE job_owners SET uid = 4242",
    "a job reopened": "UPDATE job_owners SET ended_t_s = NULL",
    "a program's owner": "UPDATE program_owners SET uid = 4242",
    "a reporter's seq": "UPDATE job_clients SET seq = seq - 1",
    "a measured total": "UPDATE gpu_totals SET flops = flops * (1 + 1e-12)",
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_every_derived_column_is_compared_exactly(written: Path, tmp_path: Path,
                                                  what: str) -> None:
    path = tmp_path / LEDGER_FILENAME
    shutil.copy(written, path)
    ok = subprocess.run([sys.executable, "-m", "gpuflops", "verify", "--state-dir",
                         str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert ok.returncode == 0, ok.stderr
    con = sqlite3.connect(path)
    assert con.execute(TAMPERING[what]).rowcount >= 1
    con.commit()
    con.close()
    bad = subprocess.run([sys.executable, "-m", "gpuflops", "verify", "--state-dir",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert bad.returncode == 1, what
    assert "differs from the chain" in bad.stderr
