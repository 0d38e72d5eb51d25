"""A rewritten ledger that verifies on its own is proved rewritten by the chain heads a real
Prometheus scraped from the daemon (issue 13: "a full rewrite with a rehashed chain passes")."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from gpuflops.ledger.chain import canonical_json, rebuild_derived, record_hash
from gpuflops.ledger.records import LEDGER_FILENAME
from tests.app.trust_support import DaemonProcess, cleanup, short_tmp
from tests.e2e.promserver import prometheus, wait_for
from tests.support import ROOT


def _verify(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuflops", "verify", "--state-dir", str(state),
                           *extra], capture_output=True, text=True, cwd=ROOT, check=False)


def _rewrite_from(path: Path, seq: int) -> None:
    """Halve one interval's FLOPs and rehash every record from it on, chain head and derived
    tables included: the forger's best, which verifies on its own."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN")
    prev = con.execute("SELECT hash FROM records WHERE seq = ?", (seq - 1,)).fetchone()[0]
    for s, content in con.execute("SELECT seq, content FROM records WHERE seq >= ? ORDER BY seq",
                                  (seq,)).fetchall():
        obj = json.loads(content)
        if s == seq:
            obj["rows"] = [[*r[:7], r[7] / 2] for r in obj["rows"]]
        new = canonical_json(obj)
        digest = record_hash(prev, new)
        con.execute("UPDATE records SET content = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (new, prev, digest, s))
        prev = digest
    con.execute("UPDATE chain_head SET hash = ? WHERE id = 1", (prev,))
    con.execute("COMMIT")
    assert rebuild_derived(con).derived_only
    con.close()


def test_verify_against_prometheus_proves_a_rehashed_rewrite() -> None:
    tmp = short_tmp("gfp")
    try:
        d = DaemonProcess(tmp, speed=20.0).wait_ready()
        scrape = [{"job_name": "gpuflops", "static_configs": [{"targets": [
            f"127.0.0.1:{d.port}"]}]}]
        with prometheus(tmp / "prom", scrape) as prom:
            def heads() -> bool:
                rows = prom.query("count_over_time(gpuflops_ledger_head_seq[1m])")
                return bool(rows) and float(rows[0]["value"][1]) >= 5
            wait_for("five scraped chain heads", heads, 30)
            d.stop()
            state = d.state
            ok = _verify(state, "--against-prometheus", prom.url)
            assert ok.returncode == 0, ok.stderr
            assert "chain heads" in ok.stdout and "are all in the chain" in ok.stdout
            ledger = state / LEDGER_FILENAME
            con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
            first = con.execute("SELECT min(seq) FROM records WHERE kind = 'interval'"
                                ).fetchone()[0]
            con.close()
            _rewrite_from(ledger, first)
            alone = _verify(state)
            assert alone.returncode == 0, alone.stderr  # the file cannot prove its own history
            proved = _verify(state, "--against-prometheus", prom.url)
        assert proved.returncode == 1, proved.stdout + proved.stderr
        assert "the chain was rewritten at or before record" in proved.stderr
        # Prometheus unreachable: it cannot be compared, which is not a pass.
        gone = _verify(state, "--against-prometheus", "http://127.0.0.1:9")
        assert gone.returncode == 2 and "cannot compare with Prometheus" in gone.stderr
    finally:
        cleanup(tmp)
