"""``gpuflops verify --central``: re-verify every node's shipped chain in the central store.

For each ledger: every record follows the previous one (seq, prev_hash), hashes to what it
claims, is canonical, names its ledger, node, cluster and seq, continues the raw range, and
carries a valid Ed25519 signature of the node's registered key (and of the pinned key, when
keys are pinned); the head row matches the chain's end; the derived tables match a replay.
The first fault of each ledger is reported with its node and seq.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuflops.ledger.central_read import CentralReader, LedgerRow
from gpuflops.ledger.rollup import RollupChainChecker, rollup_signing_message
from gpuflops.ledger.signing import verify_signature


@dataclass(frozen=True)
class CentralFault:
    """The first fault of one ledger (seq 0: the ledger as a whole)."""

    node: str
    cluster: str
    ledger_id: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return (f"node {self.node} (cluster {self.cluster}, ledger {self.ledger_id}) "
                f"seq {self.seq}: {self.reason}")


@dataclass
class CentralVerifyResult:
    ledgers: int = 0
    records: int = 0
    faults: list[CentralFault] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def verify_ledger(reader: CentralReader, led: LedgerRow,
                  pinned_key: bytes | None = None) -> tuple[int, CentralFault | None]:
    """(records checked, first fault or None) for one ledger."""

    def fault(seq: int, reason: str) -> CentralFault:
        return CentralFault(led.node, led.cluster, led.ledger_id, seq, reason)

    if pinned_key is not None and pinned_key != led.public_key:
        return 0, fault(0, f"registered public key {led.public_key.hex()} differs from the "
                           f"pinned key {pinned_key.hex()} (key swapped)")
    checker = RollupChainChecker(led.ledger_id, led.node, led.cluster)
    n = 0
    points = 0
    last_measured: dict[tuple[str, str], float] = {}
    for seq, content, prev, h, sig in reader.records(led.ledger_id):
        bad = checker.check(seq, content, prev, h)
        if bad is not None:
            return n, fault(bad.seq, bad.reason)
        if not verify_signature(led.public_key, rollup_signing_message(h), sig):
            return n, fault(seq, "signature does not verify with the node's registered key "
                                 "(record rewritten, or a re-hashed chain swapped in)")
        for key, row in checker.jobs.items():
            if row[-1] == seq and last_measured.get(key) != row[0]:
                points += 1
                last_measured[key] = row[0]
        n += 1
    if (led.head_seq, led.head_hash, led.raw_seq) != (checker.seq, checker.hash, checker.raw_last):
        return n, fault(min(led.head_seq, checker.seq + 1),
                        f"head says seq {led.head_seq} (raw {led.raw_seq}) but the chain ends at "
                        f"seq {checker.seq} (raw {checker.raw_last}): records deleted from the "
                        "end, or the head edited")
    stored = {(r.job, r.program): [r.measured_flops, r.analytic_flops, r.tokens, r.recompute_flops,
                                   r.estimate_t0_s, r.estimate_t1_s, r.first_t_s, r.last_t_s,
                                   r.hmma_flops, r.half_rate_fraction]
              for r in reader.ledger_jobs(led.ledger_id)}
    replayed = {k: v[:10] for k, v in checker.jobs.items()}
    if stored.keys() != replayed.keys() or any(
            not all(_same(a, b) for a, b in zip(stored[k], replayed[k], strict=True)) for k in stored):
        diff = sorted(k for k in stored.keys() | replayed.keys()
                      if stored.get(k) != replayed.get(k))
        return n, fault(checker.seq, f"derived job_totals differ from the chain for {diff[:3]}")
    counts = reader.derived_counts(led.ledger_id)
    want = {"events": checker.events, "gaps": checker.gaps, "job_points": points}
    for table, expected in want.items():
        if counts[table] != expected:
            return n, fault(checker.seq, f"derived table {table} has {counts[table]} rows, the "
                                         f"chain implies {expected}")
    return n, None


def verify_central(reader: CentralReader, *, node_pins: Mapping[str, bytes] | None = None,
                   progress: Callable[[LedgerRow, int], None] | None = None) -> CentralVerifyResult:
    """Verify every ledger in the store; forks nodes reported are faults too."""
    result = CentralVerifyResult()
    ledgers = reader.ledgers()
    keys_by_node: dict[tuple[str, str], set[bytes]] = {}
    for led in ledgers.values():
        keys_by_node.setdefault((led.cluster, led.node), set()).add(led.public_key)
        n, bad = verify_ledger(reader, led, (node_pins or {}).get(led.node))
        result.ledgers += 1
        result.records += n
        if bad is not None:
            result.faults.append(bad)
        if led.failed is not None and bad is None:
            result.faults.append(CentralFault(led.node, led.cluster, led.ledger_id, led.head_seq,
                                              f"fenced: {led.failed}"))
        if progress is not None:
            progress(led, n)
    for lid, raw_seq, detail, _t in reader.forks():
        led_row = ledgers.get(lid)
        if led_row is not None and not any(f.ledger_id == lid for f in result.faults):
            result.faults.append(CentralFault(led_row.node, led_row.cluster, lid, raw_seq,
                                              f"fork reported: {detail}"))
    for (cluster, node), keys in sorted(keys_by_node.items()):
        if len(keys) > 1:
            result.warnings.append(f"node {node} (cluster {cluster}) registered {len(keys)} "
                                   "different keys over its ledgers (state directory replaced?)")
        if node_pins is not None and node not in node_pins:
            result.warnings.append(f"node {node} (cluster {cluster}) has no pinned key")
    return result
