"""The report refuses what it cannot support (issue 13): a program that does not exist, a
ledger that fails verification, replayed data without --allow-demo. It exits non-zero, writes
nothing and gives no outcome; with --allow-demo every page says the data is a demo."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuflops.ledger.records import LEDGER_FILENAME
from tests.app.trust_support import DaemonProcess, cleanup, short_tmp
from tests.jobs.jobsock_client import Client
from tests.support import ROOT


@pytest.fixture(scope="module")
def demo_state() -> Path:
    tmp = short_tmp("gfr")
    d = DaemonProcess(tmp).wait_ready()
    try:
        with Client(str(d.sock)) as c:
            assert c.call(op="register", job="r1", program="real-prog")["ok"]
            assert c.call(op="add", job="r1", flops=1e12, tokens=1)["ok"]
        time.sleep(1.0)
    finally:
        d.stop()
    yield d.state
    cleanup(tmp)


def _report(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuflops", "report", "--state-dir", str(state),
                           *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_unknown_program_gets_no_outcome(demo_state: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = _report(demo_state, "--program", "no-such-prog", "--allow-demo", "--out", str(out))
    assert r.returncode == 1 and not out.exists()
    assert "no job of program 'no-such-prog'" in r.stderr
    assert "downstream_modifier" not in r.stdout + r.stderr


def test_replayed_data_needs_allow_demo_and_is_stamped_everywhere(demo_state: Path,
                                                                   tmp_path: Path) -> None:
    refused = _report(demo_state, "--program", "real-prog")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "replayed (demo) data" in refused.stderr and "--allow-demo" in refused.stderr
    doc = json.loads(_report(demo_state, "--program", "real-prog", "--allow-demo").stdout)
    assert doc["demo"]["replay_sessions"] == 1 and "DEMO DATA" in doc["demo"]["notice"]
    page = _report(demo_state, "--program", "real-prog", "--allow-demo", "--format", "html").stdout
    assert "<title>DEMO DATA: " in page
    # A fixed banner repeats on every printed page; every section carries the tag too.
    assert re.search(r"\.demo \{ position: fixed;", page)
    assert page.count('<div class="demo">') == 1
    tagged = page.count('<h2><span class="demo-tag">DEMO DATA</span>')
    assert tagged >= 7 and page.count("<h2>") == tagged
    assert "DEMO DATA, NOT A DECISION" in page


def test_a_ledger_that_fails_verification_gets_no_outcome(demo_state: Path,
                                                           tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / LEDGER_FILENAME).write_bytes((demo_state / LEDGER_FILENAME).read_bytes())
    con = sqlite3.connect(state / LEDGER_FILENAME)
    con.execute("UPDATE job_totals SET analytic_flops = analytic_flops * 10")
    con.commit()
    con.close()
    r = _report(state, "--program", "real-prog", "--allow-demo", "--format", "html")
    assert r.returncode == 1 and r.stdout == ""
    assert "the ledger fails verification: derived table job_totals row" in r.stderr
