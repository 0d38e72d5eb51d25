"""Issue 15: a real daemon ships to a real PostgreSQL over TLS (``sslmode=verify-full``), and
the read commands work over the same kind of URL.

The cluster takes TLS connections only (tests/pgserver.py, a throwaway CA from tests/pki.py).
The daemon starts with an ``sslrootcert`` file holding a CA that did not sign the server: it
keeps running and measuring, ships nothing, and its metrics and log say why. Once the right CA
is in that file, the next round ships everything (libpq reads the file at every connection, so
no restart). After a clean stop the central store equals the node ledger, and `report`,
`verify` and `gate` with ``--central`` and ``--central-password-file`` read it over TLS. The
password appears in no log and nowhere in the state directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.central_fixtures import PASSWORD, CentralDb, ClientTls
from tests.e2e.fleet_harness import Node, gpuflops, job_process, ledger_view, node_trace
from tests.e2e.promserver import wait_for

PROGRAM = "tls-ft"
CONNECT_ERRORS = 'gpuflops_central_ship_errors_total{"kind": "connect"}'




def _central_view(db: CentralDb) -> tuple[int, dict[tuple[str, str], tuple[object, ...]]]:
    with db.store("gf_read") as store:
        (ledger_id, raw_seq), = store.fetch("SELECT ledger_id, raw_seq FROM gpuflops.heads")
        jobs = {(r[0], r[1]): tuple(r[2:]) for r in store.job_rows(ledger_id)}
    return int(raw_seq), jobs


@pytest.mark.slow
def test_a_daemon_ships_over_verify_full_fails_closed_on_a_wrong_ca_and_reads_use_tls(
        central_tls: CentralDb, tls: ClientTls, tmp_short: Path) -> None:
    wd = tmp_short / "n1"
    wd.mkdir()
    ca_file = wd / "central-ca.crt"
    shutil.copyfile(tls.other_ca, ca_file)  # a CA that did not sign the server's certificate
    url = (f"postgresql://gf_ship@127.0.0.1:{central_tls.pg.port}/{central_tls.dbname}"
           f"?sslmode=verify-full&sslrootcert={ca_file}")
    with job_process(wd / "s.sock", "job-n1", PROGRAM, steps=20) as job:
        node = Node("n1", "eu", wd, node_trace(wd / "t.jsonl", job), url,
                    central_tls.password_file)
        node.start()
        try:
            job.go()
            failing = wait_for("failed shipping rounds with a backlog", lambda: (
                lambda m: m if m.get(CONNECT_ERRORS, 0) >= 2
                and m["gpuflops_central_backlog_records"] > 0 else None)(node.metrics()), 30, 0.3)
            assert node.proc is not None and node.proc.poll() is None  # it keeps running
            assert failing["gpuflops_central_fenced"] == 0  # an outage, not a fork
            assert failing.get("gpuflops_central_shipped_records_total", 0) == 0
            assert "SSL error: certificate verify failed" in node.log()
            with central_tls.store("gf_read") as store:
                assert store.fetch("SELECT count(*) FROM gpuflops.ledgers")[0][0] == 0

            shutil.copyfile(tls.ca, ca_file)  # the operator installs the right CA bundle
            wait_for("the backlog to drain", lambda: (
                lambda m: m["gpuflops_central_shipped_records_total"] > 0
                and m["gpuflops_central_backlog_records"] <= 2)(node.metrics()), 30, 0.3)
            wait_for("the job to be measured", lambda: ledger_view(node.ledger_path)["jobs"].get(
                ("job-n1", PROGRAM), (0,))[0] > 1e14, 60, 0.5)
        finally:
            code = node.stop()
    assert code == 0, node.log()

    local = ledger_view(node.ledger_path)
    raw_seq, jobs = _central_view(central_tls)
    assert raw_seq == local["head_seq"]  # every record shipped, the clean stop's included
    assert jobs == local["jobs"]  # every column, every bit
    logs = "".join(p.read_text(errors="replace") for p in node.logs)
    assert "'sslmode': 'verify-full'" in logs and PASSWORD not in logs
    for f in node.state_dir.rglob("*"):
        assert not f.is_file() or PASSWORD.encode() not in f.read_bytes(), f

    # The read commands over the same TLS URL, the password from a file.
    read = ["--central", central_tls.url("gf_read"),
            "--central-password-file", str(central_tls.password_file)]
    assert "sslmode=verify-full" in read[1]
    r = gpuflops("report", "--program", PROGRAM, *read, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"]["kind"] == "central"
    assert doc["totals"]["measured_flops"] == local["jobs"][("job-n1", PROGRAM)][0]
    r = gpuflops("verify", *read)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = wd / "programs.toml"
    threshold = 10 * doc["totals"]["measured_flops"]
    cfg.write_text(f'[programs.{PROGRAM}]\nrule = "explicit"\nthreshold_flops = {threshold!r}\n')
    r = gpuflops("gate", "--program", PROGRAM, "--planned-flops", "0", "--config", str(cfg), *read)
    assert r.returncode == 0 and "allowed" in r.stdout, r.stdout + r.stderr
    r = gpuflops("gate", "--program", PROGRAM, "--planned-flops", repr(threshold),
                 "--config", str(cfg), *read)
    assert r.returncode == 1 and "REFUSED" in r.stderr, r.stdout + r.stderr
    # The same commands without TLS are turned away by the server (hostssl only): exit 3 for
    # the gate, "cannot tell", since it fails closed.
    plain = ["--central", central_tls.pg.plain_url("gf_read", central_tls.dbname),
             "--central-password-file", str(central_tls.password_file)]
    r = gpuflops("gate", "--program", PROGRAM, "--planned-flops", "0", "--config", str(cfg), *plain)
    assert r.returncode == 3 and "no encryption" in r.stderr, r.stdout + r.stderr
    assert PASSWORD not in r.stdout + r.stderr
