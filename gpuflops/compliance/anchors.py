"""Prove a rewritten ledger with what Prometheus recorded: the chain heads the daemon exported
(``gpuflops_ledger_head_seq`` and ``gpuflops_ledger_head_hash_prefix``, one pair per scrape)
are a history kept off the node. A chain rewritten from record k on, even rehashed so that it
verifies on its own, no longer has the hashes Prometheus saw for records k and later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpuflops.compliance.prometheus import PrometheusSource, promql_escape
from gpuflops.ledger.chain import HASH_PREFIX_HEX, hash_prefix
from gpuflops.ledger.store import Ledger

_WINDOW_S = 86400  # one query per day of the ledger's life


@dataclass(frozen=True)
class AnchorCheck:
    """The outcome of comparing the ledger with the heads Prometheus recorded."""

    ok: bool
    ledger_id: str
    heads: int  # distinct (seq, hash prefix) pairs Prometheus recorded
    reason: str | None = None  # what proves a rewrite, or why nothing could be compared


def check_against_prometheus(ledger: Ledger, source: PrometheusSource, *,
                             now: Callable[[], float] = time.time) -> AnchorCheck:
    """Every head Prometheus recorded for this ledger must be a record of its chain."""
    ledger_id = ledger.ledger_id()
    head_seq, _head_hash = ledger.head()
    sel = f'{{ledger_id="{promql_escape(ledger_id)}"}}'
    start = _genesis_time(ledger)
    end = now()
    pairs: dict[tuple[int, int], float] = {}  # (seq, prefix) -> first time seen
    t = end
    while t > start - _WINDOW_S:
        seqs = source.matrix(f"gpuflops_ledger_head_seq{sel}[{_WINDOW_S}s]", t)
        prefixes = source.matrix(f"gpuflops_ledger_head_hash_prefix{sel}[{_WINDOW_S}s]", t)
        # One scrape stamps both gauges with its time: join them on the target and the time.
        by_key = {(_target(lab), ts): v for lab, points in prefixes for ts, v in points}
        for lab, points in seqs:
            for ts, seq in points:
                prefix = by_key.get((_target(lab), ts))
                if prefix is not None:
                    key = (int(seq), int(prefix))
                    pairs[key] = min(ts, pairs.get(key, ts))
        t -= _WINDOW_S
    if not pairs:
        return AnchorCheck(False, ledger_id, 0, f"Prometheus holds no chain head of ledger "
                           f"{ledger_id}: nothing to compare (is it scraping this node?)")
    for (seq, prefix), seen in sorted(pairs.items()):
        digest = ledger.record_hash_at(seq)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen))
        if digest is None:
            return AnchorCheck(False, ledger_id, len(pairs), (
                f"Prometheus saw head seq {seq} at {when}, but the chain ends at {head_seq}: "
                "records were deleted from its end (or lost to a power cut under "
                "ledger_sync NORMAL)"))
        if hash_prefix(digest) != prefix:
            return AnchorCheck(False, ledger_id, len(pairs), (
                f"Prometheus saw head seq {seq} with hash {prefix:0{HASH_PREFIX_HEX}x}... at "
                f"{when}, but the ledger's record {seq} has hash {digest}: the chain was "
                f"rewritten at or before record {seq}"))
    return AnchorCheck(True, ledger_id, len(pairs))


def _target(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def _genesis_time(ledger: Ledger) -> float:
    content = ledger.record_content_at(1)
    return float(json.loads(content).get("t_s", 0.0)) if content else 0.0
