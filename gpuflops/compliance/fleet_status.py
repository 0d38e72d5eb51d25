"""What ``gpuflops central serve`` exports: program totals and thresholds from the central store,
and each node's shipping health, as one immutable snapshot refreshed in the background.

Program totals here reconcile whole-job totals (like ``report --prometheus``); the report
matches estimate windows. Only nodes that shipped within ``node_horizon_s`` are exported, so
the series of departed nodes age out, while their FLOPs stay in the program totals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpuflops.compliance.fleet import job_inputs
from gpuflops.compliance.journal import check_journal, journal_rows, to_programs_config
from gpuflops.compliance.programs import UNATTRIBUTED, evaluate_program, merge_metadata
from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig
from gpuflops.ledger.central import CentralError
from gpuflops.ledger.central_read import CentralReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgramFigures:
    program: str
    flops_by_basis: Mapping[str, float]
    threshold_flops: float
    rule: str
    ratio: float
    nodes: int
    clusters: tuple[str, ...]
    decision: str | None  # latest recorded decision's outcome


@dataclass(frozen=True)
class NodeHealth:
    node: str
    cluster: str
    shipped_raw_records: int
    last_ingest_s: float | None
    last_record_s: float | None
    fenced: bool


@dataclass(frozen=True)
class FleetSnapshot:
    programs: tuple[ProgramFigures, ...] = ()
    nodes: tuple[NodeHealth, ...] = ()
    forks: int = 0
    errors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    refreshed_s: float | None = None
    refresh_failures: int = 0
    up: bool = False


def build_snapshot(reader: CentralReader, fallback: ProgramsConfig, now_s: float,
                   node_horizon_s: float = 7 * 86400.0) -> FleetSnapshot:
    """Read the store once and evaluate every program (raises CentralError)."""
    ledgers = reader.ledgers()
    rows = reader.all_jobs()
    journals = journal_rows(reader.store.journal())
    signers = reader.store.signers()
    events = [ev for _lid, ev in reader.events_all(("register",))]
    meta = merge_metadata(events)
    programs, errors = [], {}
    for program in sorted({r.program for r in rows} - {UNATTRIBUTED}):
        prow = [r for r in rows if r.program == program]
        journal = check_journal(program, journals.get(program, []), signers)
        if journal.fault is not None:
            errors[program] = f"journal record {journal.fault.seq}: {journal.fault.reason}"
        definition = journal.definition
        config = to_programs_config(program, definition, fallback) if definition else fallback
        inputs = job_inputs(reader, prow, meta, matched=False)
        try:
            st = evaluate_program(program, inputs, config,
                                  [m for (_j, p), m in meta.items() if p == program])
        except ProgramConfigError as exc:
            errors[program] = str(exc)
            continue
        decisions = journal.decisions
        lids = {r.ledger_id for r in prow}
        programs.append(ProgramFigures(
            program, MappingProxyType(dict(st.flops_by_basis)), st.threshold.flops,
            st.threshold.rule, st.ratio, len(lids),
            tuple(sorted({ledgers[x].cluster for x in lids if x in ledgers})),
            decisions[-1].outcome if decisions else None))
    latest: dict[tuple[str, str], NodeHealth] = {}
    for led in ledgers.values():
        seen = led.ingested_at_s
        if seen is None or now_s - seen > node_horizon_s:
            continue
        key = (led.cluster, led.node)
        prev = latest.get(key)
        if prev is None or (prev.last_ingest_s or 0) <= seen:
            latest[key] = NodeHealth(led.node, led.cluster, led.raw_seq, seen, led.raw_t_s,
                                     led.failed is not None)
    return FleetSnapshot(tuple(programs), tuple(latest[k] for k in sorted(latest)),
                         len(reader.forks()), MappingProxyType(errors), now_s, 0, True)


class SnapshotRefresher:
    """Rebuilds the snapshot every ``period_s`` on its own thread; scrapes read the last one."""

    def __init__(self, build: Callable[[float], FleetSnapshot], period_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._build = build
        self._period_s = period_s
        self._clock = clock
        self._snapshot = FleetSnapshot()
        self._failures = 0
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-refresh", daemon=True)

    def snapshot(self) -> FleetSnapshot:
        return self._snapshot

    def refresh(self) -> None:
        try:
            snap = self._build(self._clock())
        except (CentralError, ProgramConfigError) as exc:
            self._failures += 1
            old = self._snapshot
            self._snapshot = FleetSnapshot(old.programs, old.nodes, old.forks, old.errors,
                                           old.refreshed_s, self._failures, False)
            if not self._warned:
                self._warned = True
                log.warning("central store refresh failed (keeping the last figures): %s", exc)
            else:
                log.debug("central store refresh failed: %s", exc)
            return
        self._snapshot = FleetSnapshot(snap.programs, snap.nodes, snap.forks, snap.errors,
                                       snap.refreshed_s, self._failures, True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
