"""`gpuflops gate` and `gpuflops decide` as a pipeline runs them: against the central store
(real PostgreSQL) and against a node's own ledger with a local journal file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpuflops.compliance.journal import new_record
from gpuflops.ledger.signing import load_key
from tests.central_fixtures import CentralDb
from tests.e2e.fleet_harness import gpuflops
from tests.ledger.fleet_helpers import Fleet, local_jobs, ship_fleet


@pytest.fixture
def fleet(central: CentralDb, tmp_path: Path) -> Fleet:
    return ship_fleet(central, tmp_path)


def _total(fleet: Fleet) -> float:
    """The program's compliance figure over the node ledgers, under the default policy."""
    from gpuflops.compliance.programs import job_inputs
    from gpuflops.compliance.reconcile import reconcile_job
    from gpuflops.ledger.store import Ledger

    total = []
    for path in fleet.ledgers.values():
        led = Ledger.open(path, clock=lambda: 0.0, readonly=True)
        try:
            inputs = job_inputs(led, led.totals(), led.job_events("prog"), "prog")
        finally:
            led.close()
        total += [reconcile_job(i).compliance_flops for i in inputs]
    return math.fsum(total)


def test_gate_refuses_at_the_level_and_passes_after_a_recorded_decision(
        fleet: Fleet, tmp_path: Path) -> None:
    c = fleet.central
    read = ["--central", c.url("gf_read"), "--central-password-file", str(c.password_file)]
    decide = ["--central", c.url("gf_decide"), "--central-password-file", str(c.password_file)]
    key = tmp_path / "alice.key"
    assert gpuflops("central", "keygen", "--out", str(key)).returncode == 0
    r = gpuflops("central", "signer", "add", "--central", c.admin_url, "--name", "alice",
                 "--key", str(key))
    assert r.returncode == 0, r.stderr
    total = _total(fleet)
    threshold = total / 0.7  # the program stands at 70% of its threshold
    r = gpuflops("central", "program", "set", *decide, "--program", "prog", "--by", "alice",
                 "--key", str(key), "--note", "base compute unknown; legal set 1/0.7 of today",
                 "--rule", "explicit", "--threshold-flops", repr(threshold),
                 "--gate-level", "0.8", "--gate-level", "1.0")
    assert r.returncode == 0, r.stderr

    r = gpuflops("gate", "--program", "prog", "--planned-flops", repr(0.05 * threshold), *read)
    assert r.returncode == 0, r.stderr
    assert "allowed" in r.stdout and "below the first gate level (80%)" in r.stdout
    r = gpuflops("gate", "--program", "prog", "--planned-flops", repr(0.2 * threshold), *read,
                 "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["allowed"] is False and doc["level_reached"] == 0.8
    assert doc["ratio_now"] == pytest.approx(0.7) and doc["ratio_after"] == pytest.approx(0.9)
    assert "no decision is recorded" in doc["reason"]

    # The planned run's FLOPs straight from the estimator: 6 N D for a parameter count.
    tokens = round(0.2 * threshold / 6e9)
    est = gpuflops("estimate", "--params", "1e9", "--tokens", str(tokens), "--seq-len", "2048",
                   "--method", "full", "--json")
    assert est.returncode == 0, est.stderr
    r = gpuflops("gate", "--program", "prog", "--planned-flops-from", "-", *read, stdin=est.stdout)
    assert r.returncode == 1 and "REFUSED" in r.stderr and "80% gate level" in r.stderr

    # With checkpointing, the estimate's total carries recomputation that the compliance figure
    # leaves out (the default policy): the gate counts what the program will be charged.
    ck = ["--params", "1e9", "--layers", "16", "--attention-dim", "2048", "--seq-len", "2048",
          "--method", "full", "--activation-checkpointing", "--json"]
    per_token = json.loads(gpuflops("estimate", *ck, "--tokens", "1e9").stdout)["estimates"]["full"]
    tokens = 0.095 * threshold / (per_token["total_excluding_recompute"] / 1e9)
    est_ck = gpuflops("estimate", *ck, "--tokens", repr(tokens))
    full = json.loads(est_ck.stdout)["estimates"]["full"]
    assert full["total"] > 0.1 * threshold > full["total_excluding_recompute"]
    r = gpuflops("gate", "--program", "prog", "--planned-flops-from", "-", *read, "--json",
                 stdin=est_ck.stdout)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["planned_flops"] == pytest.approx(
        full["total_excluding_recompute"])

    r = gpuflops("decide", "--program", "prog", "--outcome", "approved_to_continue",
                 "--up-to-ratio", "0.95", "--by", "alice", "--key", str(key),
                 "--note", "reviewed: stays below the threshold", *decide)
    assert r.returncode == 0, r.stderr
    r = gpuflops("gate", "--program", "prog", "--planned-flops-from", "-", *read, stdin=est.stdout)
    assert r.returncode == 0, r.stderr
    assert "covered by decision #2 (approved_to_continue, by alice" in r.stdout
    r = gpuflops("gate", "--program", "prog", "--planned-flops", repr(0.3 * threshold), *read)
    assert r.returncode == 1 and "does not reach that far" in r.stderr

    # The report shows the definition's history and the decision.
    rep = gpuflops("report", "--program", "prog", *read, "--format", "json")
    doc = json.loads(rep.stdout)
    assert [d["outcome"] for d in doc["fleet"]["decisions"]] == ["approved_to_continue"]
    assert doc["fleet"]["definition"]["history"][0]["by"] == "alice"
    assert doc["threshold"]["rule"] == "explicit"

    # A decision forged in the database makes the gate fail closed (exit 3).
    mallory = tmp_path / "mallory.key"
    assert gpuflops("central", "keygen", "--out", str(mallory)).returncode == 0
    with c.admin() as admin:
        rows = admin.journal("prog")
        from gpuflops.compliance.journal import journal_rows

        head = journal_rows(rows)["prog"][-1]
        forged = new_record("prog", head, "decision", {"outcome": "becomes_provider",
                                                       "note": "", "up_to_ratio": None,
                                                       "evidence": {}}, "alice",
                            load_key(mallory), 1.0)
        admin.append_journal(forged.program, forged.seq, forged.kind, forged.content,
                             forged.prev_hash, forged.hash, forged.signer, forged.sig)
    r = gpuflops("gate", "--program", "prog", "--planned-flops", "1", *read)
    assert r.returncode == 3 and "record 3" in r.stderr and "signature" in r.stderr
    # And no decision is chained onto it.
    r = gpuflops("decide", "--program", "prog", "--outcome", "halt", "--by", "alice",
                 "--key", str(key), "--note", "on a forged journal", *decide)
    assert r.returncode == 3 and "record 3" in r.stderr and "signature" in r.stderr
    with c.admin() as admin:
        after = journal_rows(admin.journal("prog"))["prog"]
    assert [x.seq for x in after] == [*(x.seq for x in journal_rows(rows)["prog"]), forged.seq]
    r = gpuflops("verify", *read)
    assert r.returncode == 1 and "journal of program prog record 3" in r.stderr


def test_gate_fails_closed_without_a_store_and_on_bad_input(tmp_path: Path) -> None:
    r = gpuflops("gate", "--program", "p", "--planned-flops", "1", "--central",
                 "postgresql://nobody@127.0.0.1:1/none", timeout_s=60)
    assert r.returncode == 3 and "cannot tell" in r.stderr
    r = gpuflops("gate", "--program", "p", "--planned-flops", "1", "--state-dir", str(tmp_path))
    assert r.returncode == 3 and "no ledger" in r.stderr
    r = gpuflops("gate", "--program", "p", "--planned-flops", "-5", "--state-dir", str(tmp_path))
    assert r.returncode in (2, 3)
    r = gpuflops("gate", "--program", "p", "--central", "postgresql://u:pw@127.0.0.1/db",
                 "--planned-flops", "1")
    assert r.returncode != 0 and "contains a password" in r.stderr


def test_local_gate_and_decision_without_a_central_store(fleet: Fleet, tmp_path: Path) -> None:
    state = fleet.ledgers["a"].parent
    total = math.fsum(v[0] for k, v in local_jobs(fleet.ledgers["a"]).items() if k[1] == "prog")
    cfg = tmp_path / "programs.toml"
    cfg.write_text(f'[programs.prog]\nrule = "explicit"\nthreshold_flops = {total / 0.9!r}\n')
    local = ["--state-dir", str(state), "--config", str(cfg)]
    r = gpuflops("gate", "--program", "prog", "--planned-flops", "0", *local)
    assert r.returncode == 1 and "80% gate level" in r.stderr
    key = tmp_path / "bob.key"
    assert gpuflops("central", "keygen", "--out", str(key)).returncode == 0
    r = gpuflops("decide", "--program", "prog", "--outcome", "stays_downstream_modifier",
                 "--by", "bob", "--key", str(key), "--note", "last run of the program", *local)
    assert r.returncode == 0, r.stderr
    assert (state / "journal.jsonl").exists()
    r = gpuflops("gate", "--program", "prog", "--planned-flops", repr(0.05 * total), *local)
    assert r.returncode == 0, r.stderr
    r = gpuflops("gate", "--program", "prog", "--planned-flops", repr(0.2 * total), *local)
    assert r.returncode == 1  # beyond the threshold: stays_downstream_modifier stops at 100%


def test_daemon_refuses_a_password_in_argv_and_central_without_ledger(tmp_path: Path) -> None:
    base = ["daemon", "--demo", "--listen", "127.0.0.1:0", "--no-socket", "--state-dir",
            str(tmp_path)]
    r = gpuflops(*base, "--central", "postgresql://gf_ship:hunter2@127.0.0.1:1/db")
    assert r.returncode != 0 and "contains a password" in r.stderr
    assert "hunter2" not in r.stderr
    r = gpuflops(*base, "--no-ledger", "--central", "postgresql://gf_ship@127.0.0.1:1/db")
    assert r.returncode != 0 and "--no-ledger" in r.stderr
    assert not (tmp_path / "node.key").exists()  # nothing started
