"""Programs from the central store (real PostgreSQL): totals over nodes and clusters, the
report, program definitions and decisions, and `verify --central` against tampering."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jsonschema
import pytest

from gpuflops.compliance import programs
from gpuflops.compliance.fleet import build_central_report, job_inputs, load_program
from gpuflops.compliance.journal import check_journal, journal_rows, new_record
from gpuflops.compliance.reconcile import reconcile_job
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.ledger.central import CentralStore
from gpuflops.ledger.central_read import CentralReader
from gpuflops.ledger.central_verify import verify_central
from gpuflops.ledger.chain import canonical_json, record_hash
from gpuflops.ledger.rollup import rollup_signing_message
from gpuflops.ledger.signing import SigningKey, generate_key
from gpuflops.ledger.store import Ledger
from tests.central_fixtures import CentralDb
from tests.ledger.fleet_helpers import Fleet, local_jobs, ship_fleet

SCHEMA = Path(__file__).resolve().parents[2] / "gpuflops" / "compliance" / "report_schema.json"
T0 = 1_760_000_000.0


@pytest.fixture
def fleet(central: CentralDb, tmp_path: Path) -> Fleet:
    return ship_fleet(central, tmp_path)


def _reader(store: CentralStore) -> CentralReader:
    return CentralReader(store)


def test_program_totals_over_nodes_and_clusters_equal_the_node_ledgers(fleet: Fleet) -> None:
    local = {n: local_jobs(p) for n, p in fleet.ledgers.items()}
    with fleet.central.store("gf_read") as store:
        fp = load_program(_reader(store), "prog", fallback=ProgramsConfig())
        doc = build_central_report(fp, _reader(store), now_s=time.time(),
                                   source=store.config.describe())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()), format_checker=jsonschema.FormatChecker())
    by_job = {j["job"]: j for j in doc["jobs"]}
    for job in {k[0] for n in local.values() for k in n if k[1] == "prog"}:
        want = math.fsum(v[0] for n in local.values() for k, v in n.items() if k == (job, "prog"))
        assert by_job[job]["measured_flops"] == want  # exact
    assert doc["totals"]["measured_flops"] == sum(j["measured_flops"] for j in doc["jobs"])
    assert doc["source"]["kind"] == "central" and "password" not in json.dumps(doc["source"])
    assert doc["fleet"]["clusters"] == ["c1", "c2"]
    assert {(n["node"], n["cluster"]) for n in doc["fleet"]["nodes"]} == {
        ("a", "c1"), ("b", "c1"), ("c", "c2")}
    assert all(n["head_signature_verified"] and not n["fenced"] for n in doc["fleet"]["nodes"])
    assert doc["threshold"]["rule"] == "one_third_of_base"  # base compute from registrations
    assert {a["job"]: a["nodes"] for a in doc["attempts"]}["train-a"] == ["a"]
    assert doc["coverage"]["gaps"] and {g["node"] for g in doc["coverage"]["gaps"]} <= {"a", "b", "c"}
    assert doc["series"][-1]["cumulative_flops"] == doc["totals"]["measured_flops"]
    # The v3 figures, built by the node report's code: per job and summed.
    assert doc["totals"]["hardware_flops"] == sum(j["hardware_flops"] for j in doc["jobs"]) > 0
    assert all(j["basis_used"] and "band" in j and "half_rate_fraction" in j for j in doc["jobs"])
    # Every node's shipped daemon starts name no counter source: they read NVML, as a node's
    # own report says of the same ledger.
    assert doc["method"]["counter_sources"] == ["nvml"]


def test_central_reconciliation_of_one_node_equals_the_nodes_own(fleet: Fleet) -> None:
    """Per ledger, the central job inputs carry the node's every figure (HMMA FLOPs and the
    latest half-rate claim included) and reconcile to the node's result, bit for bit; over
    ledgers, the hardware figure is the sum of each node's."""
    claimed = 0
    hardware: dict[str, list[float]] = {}
    with fleet.central.store("gf_read") as store:
        reader = _reader(store)
        rows = reader.program_jobs("prog")
        everywhere = {(i.job, i.program): i for i in job_inputs(reader, rows, {}, matched=False)}
        for node, lid in fleet.ids.items():
            central = {(i.job, i.program): i for i in job_inputs(
                reader, [r for r in rows if r.ledger_id == lid], {}, matched=False)}
            led = Ledger.open(fleet.ledgers[node], clock=time.time, readonly=True)
            try:
                local = {(i.job, i.program): dataclasses.replace(
                    i, matched_measured_flops=None, metadata={})
                    for i in programs.job_inputs(led, led.totals(), [], "prog")}
            finally:
                led.close()
            assert central == local
            claimed += sum(i.half_rate_fraction is not None and i.hmma_flops > 0
                           for i in local.values())
            for k, i in local.items():
                assert reconcile_job(central[k]) == reconcile_job(i)
                hardware.setdefault(k[0], []).append(reconcile_job(i).hardware_flops)
    assert claimed > 0  # the claims and tensor FLOPs were exercised
    for (job, _p), i in everywhere.items():
        assert math.isclose(reconcile_job(i).hardware_flops, math.fsum(hardware[job]),
                            rel_tol=1e-12)


def test_definitions_and_decisions_are_signed_and_a_forged_one_is_caught(
        fleet: Fleet, tmp_path: Path) -> None:
    alice = generate_key(tmp_path / "alice.key")
    with fleet.central.admin() as admin:
        admin.add_signer("alice", alice.public_key)
    with fleet.central.store("gf_decide") as store:
        r1 = new_record("prog", None, "program", {"definition": {
            "rule": "explicit", "threshold_flops": 1e18, "gate_levels": [0.5, 1.0]},
            "note": "set by legal"}, "alice", alice, T0)
        r2 = new_record("prog", r1, "decision", {"outcome": "approved_to_continue",
                                                 "up_to_ratio": 2.0, "note": "ok", "evidence": {}},
                        "alice", alice, T0 + 1)
        for r in (r1, r2):
            store.append_journal(r.program, r.seq, r.kind, r.content, r.prev_hash, r.hash, r.signer, r.sig)
        fp = load_program(_reader(store), "prog", fallback=ProgramsConfig())
        assert fp.status.threshold.rule == "explicit" and fp.status.threshold.flops == 1e18
        assert fp.journal.fault is None and fp.journal.gate_levels == (0.5, 1.0)
        assert [d.outcome for d in fp.journal.decisions] == ["approved_to_continue"]
    # Someone with write access to the database adds a decision under alice's name.
    mallory = generate_key(tmp_path / "mallory.key")
    forged = new_record("prog", r2, "decision", {"outcome": "stays_downstream_modifier",
                                                 "note": "forged", "up_to_ratio": None,
                                                 "evidence": {}}, "alice", mallory, T0 + 2)
    with fleet.central.admin() as admin:
        admin.append_journal(forged.program, forged.seq, forged.kind, forged.content,
                             forged.prev_hash, forged.hash, forged.signer, forged.sig)
        j = check_journal("prog", journal_rows(admin.journal("prog"))["prog"], admin.signers())
    assert j.fault is not None and j.fault.seq == 3 and "signature does not verify" in j.fault.reason
    assert [d.seq for d in j.decisions] == [2]  # the forged decision is not taken into account


def _tamper(admin: CentralStore, ledger_id: str, what: str, key: SigningKey | None) -> int:
    """Tamper with one node's shipped chain; returns the seq verify must name."""
    rows = admin.fetch("SELECT seq, content, prev_hash, hash FROM gpuflops.records"
                       " WHERE ledger_id = %s ORDER BY seq", (ledger_id,))
    n = len(rows)
    if what == "edit":
        admin.execute("UPDATE gpuflops.records SET content = replace(content, '\"events\"', "
                      "'\"events\" ') WHERE ledger_id = %s AND seq = 5", (ledger_id,))
        return 5
    if what == "delete_middle":
        admin.execute("DELETE FROM gpuflops.records WHERE ledger_id = %s AND seq = 4", (ledger_id,))
        return 4
    if what == "delete_last":
        admin.execute("DELETE FROM gpuflops.records WHERE ledger_id = %s AND seq = %s",
                      (ledger_id, n))
        return n
    if what == "reorder":
        for a, b in ((6, 10**9), (7, 6), (10**9, 7)):  # swap records 6 and 7
            admin.execute("UPDATE gpuflops.records SET seq = %s WHERE ledger_id = %s AND seq = %s",
                          (b, ledger_id, a))
        return 6
    # A re-hashed chain: one job's figure lowered from seq 3 on, every hash recomputed, the head
    # and derived tables rewritten to match; re-signed with the attacker's key if given.
    prev = rows[1][3]
    for seq, content, _p, _h in rows[2:]:
        obj = json.loads(content)
        for row in obj["jobs"]:
            row[2] = row[2] * 0.5
        content = canonical_json(obj)
        h = record_hash(prev, content)
        sig = None if key is None else key.sign(rollup_signing_message(h))
        admin.execute("UPDATE gpuflops.records SET content = %s, prev_hash = %s, hash = %s,"
                      " sig = coalesce(%s, sig) WHERE ledger_id = %s AND seq = %s",
                      (content, prev, h, sig, ledger_id, seq))
        prev = h
    admin.execute("UPDATE gpuflops.heads SET hash = %s WHERE ledger_id = %s", (prev, ledger_id))
    admin.execute("UPDATE gpuflops.job_totals SET measured_flops = measured_flops * 0.5"
                  " WHERE ledger_id = %s", (ledger_id,))
    if key is not None:
        admin.execute("UPDATE gpuflops.ledgers SET public_key = %s WHERE ledger_id = %s",
                      (key.public_key, ledger_id))
    return 3


@pytest.mark.parametrize("what", ["edit", "delete_middle", "delete_last", "reorder", "rehash",
                                  "rehash_and_resign"])
def test_verify_central_names_node_and_seq_of_tampering(fleet: Fleet, tmp_path: Path,
                                                        what: str) -> None:
    with fleet.central.store("gf_read") as store:
        clean = verify_central(_reader(store))
    assert clean.ok and clean.ledgers == 3, clean.faults
    attacker = generate_key(tmp_path / "attacker.key") if what == "rehash_and_resign" else None
    with fleet.central.admin() as admin:
        seq = _tamper(admin, fleet.ids["b"], "rehash" if attacker else what, attacker)
    pins = {n: k.public_key for n, k in fleet.keys.items()}
    with fleet.central.store("gf_read") as store:
        result = verify_central(_reader(store), node_pins=pins)
    assert [(f.node, f.seq) for f in result.faults] == [("b", 0 if attacker else seq)], result.faults
    if attacker:
        assert "pinned key" in result.faults[0].reason
    elif what.startswith("rehash"):
        assert "signature" in result.faults[0].reason
    if what == "edit":  # as an auditor runs it
        from tests.e2e.fleet_harness import gpuflops

        r = gpuflops("verify", "--central", fleet.central.url("gf_read"),
                     "--central-password-file", str(fleet.central.password_file))
        assert r.returncode == 1
        assert f"FAILED: node b (cluster c1, ledger {fleet.ids['b']}) seq 5: hash" in r.stderr


@pytest.mark.parametrize("column", ["measured_flops", "hmma_flops"])
def test_tampered_derived_totals_are_caught(fleet: Fleet, column: str) -> None:
    with fleet.central.admin() as admin:
        admin.execute(f"UPDATE gpuflops.job_totals SET {column} = {column} - 1"
                      " WHERE ledger_id = %s AND program = 'prog'", (fleet.ids["c"],))
        result = verify_central(_reader(admin))
    assert [f.node for f in result.faults] == ["c"] and "job_totals" in result.faults[0].reason


def test_measured_inside_a_window_is_interpolated_between_shipped_points() -> None:
    from gpuflops.ledger.central_read import interpolate

    # Points at t=10 (100 FLOPs) and t=20 (300): halfway is 200.
    assert interpolate((10.0, 100.0), (20.0, 300.0), 15.0, 0.0) == 200.0
    assert interpolate(None, (20.0, 300.0), 15.0, 10.0) == 150.0  # from 0 at the first interval
    assert interpolate((10.0, 100.0), None, 99.0, 0.0) == 100.0  # nothing shipped after
    assert interpolate(None, None, 5.0, None) == 0.0
