"""Assemble per-job inputs from the ledger and evaluate programs (daemon and report share this)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpuflops.compliance.reconcile import JobInput, ReconcileResult, reconcile_job
from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig, ProgramStatus, program_status
from gpuflops.ledger.records import JobEventRecord, LedgerTotals
from gpuflops.ledger.store import Ledger
from gpuflops.model import UNATTRIBUTED


@dataclass(frozen=True)
class Attempt:
    """One (job, attempt) as registered, with every rank's registration merged."""

    job: str
    program: str
    attempt: int | None
    resumed_from: str | None
    first_t_s: float
    nodes: tuple[str, ...]
    ranks: int
    metadata: Mapping[str, Any]


def merge_metadata(events: Sequence[JobEventRecord]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (job, program): registration metadata, later registrations overriding earlier keys."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in events:
        if ev.kind == "register":
            merged = out.setdefault((ev.job, ev.program), {})
            merged.update({k: v for k, v in ev.payload.items() if v is not None})
    return out


def attempts(events: Sequence[JobEventRecord]) -> list[Attempt]:
    """Attempts in order of first registration."""
    groups: dict[tuple[str, str, object], list[JobEventRecord]] = {}
    for ev in events:
        if ev.kind == "register":
            groups.setdefault((ev.job, ev.program, ev.payload.get("attempt")), []).append(ev)
    out = []
    for (job, program, attempt), evs in groups.items():
        meta: dict[str, Any] = {}
        for ev in evs:
            meta.update({k: v for k, v in ev.payload.items() if v is not None})
        nodes = tuple(sorted({str(e.payload["node"]) for e in evs if e.payload.get("node")}))
        resumed = meta.get("resumed_from")
        out.append(Attempt(
            job=job, program=program,
            attempt=int(attempt) if isinstance(attempt, int | float) else None,
            resumed_from=str(resumed) if resumed else None,
            first_t_s=min(e.t_s for e in evs), nodes=nodes,
            ranks=len({e.payload.get("rank") for e in evs}), metadata=meta))
    out.sort(key=lambda a: a.first_t_s)
    return out


def job_inputs(ledger: Ledger, totals: LedgerTotals, events: Sequence[JobEventRecord],
               program: str | None = None) -> list[JobInput]:
    """JobInputs from persisted totals; measured is matched to the estimates' span."""
    meta = merge_metadata(events)
    out = []
    for key, t in sorted(totals.jobs.items(), key=lambda kv: (kv[0].program, kv[0].job)):
        if key.program == UNATTRIBUTED or (program is not None and key.program != program):
            continue
        matched = None
        if t.estimate_t0_s is not None and t.estimate_t1_s is not None:
            matched = ledger.matched_measured(key.job, key.program, t.estimate_t0_s,
                                              t.estimate_t1_s)
        out.append(JobInput(
            job=key.job, program=key.program, measured_flops=t.measured_flops,
            analytic_flops=t.analytic_flops, recompute_flops=t.recompute_flops,
            tokens=t.tokens, matched_measured_flops=matched,
            metadata=meta.get((key.job, key.program), {}), hmma_flops=t.hmma_flops,
            half_rate_fraction=t.half_rate_fraction))
    return out


def evaluate_program(program: str, inputs: Sequence[JobInput], config: ProgramsConfig,
                     metadata: Sequence[Mapping[str, Any]] = ()) -> ProgramStatus:
    """Reconcile every job of a program and roll them up against its threshold."""
    cfg = config.for_program(program)
    results: list[ReconcileResult] = [
        reconcile_job(i, assumed_precision=cfg.assumed_precision, tolerance=cfg.tolerance,
                      policy=cfg.policy)
        for i in inputs if i.program == program]
    metas = list(metadata) or [dict(i.metadata) for i in inputs if i.program == program]
    return program_status(cfg, results, metas)


def evaluate_ledger(ledger: Ledger, config: ProgramsConfig
                    ) -> tuple[dict[str, ProgramStatus], dict[str, str]]:
    """Every program in the ledger: (statuses, configuration errors by program).

    A program whose configuration cannot be applied is reported in the errors, not raised,
    so one bad program never stops the others from being exported.
    """
    totals = ledger.totals()
    events = ledger.job_events(kinds=("register",))  # all that job inputs need
    inputs = job_inputs(ledger, totals, events)
    statuses: dict[str, ProgramStatus] = {}
    errors: dict[str, str] = {}
    for program in sorted({i.program for i in inputs}):
        try:
            statuses[program] = evaluate_program(program, inputs, config)
        except ProgramConfigError as exc:
            errors[program] = str(exc)
    return statuses, errors


@dataclass(frozen=True)
class ProgramView:
    """Reconciliation and threshold results for the exporter, replaced whole every refresh."""

    statuses: Mapping[str, ProgramStatus] = field(default_factory=lambda: MappingProxyType({}))
    errors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    refreshed_s: float | None = None


log = logging.getLogger(__name__)


class ProgramEvaluator:
    """Keeps a ProgramView current on its own thread, never the sampling thread's.

    Each pass re-evaluates only the programs with new intervals or job events since the last
    one (every program at the first pass and after a reload), reading only their jobs: its cost
    follows the programs that changed, not how many programs the ledger holds."""

    def __init__(self, ledger: Ledger, config: ProgramsConfig, *, period_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._config = config
        self._period_s = period_s
        self._clock = clock
        self._seq = 0
        self._full = True
        self._statuses: dict[str, ProgramStatus] = {}
        self._errors: dict[str, str] = {}
        self.view = ProgramView()
        self.passes = 0
        self.evaluated = 0  # program evaluations over all passes
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self, config: ProgramsConfig) -> None:
        """A new configuration: every program is evaluated again at the next pass (soon)."""
        self._config = config
        self._full = True
        self._wake.set()

    def refresh(self) -> None:
        """One pass (the thread's; tests call it directly)."""
        full, self._full = self._full, False
        config = self._config
        if full:
            programs, head = self._ledger.programs_changed_since(0)
            self._statuses, self._errors = {}, {}
        else:
            programs, head = self._ledger.programs_changed_since(self._seq)
        for program in sorted(programs - {UNATTRIBUTED}):
            jobs = self._ledger.program_jobs(program)
            events = self._ledger.job_events(program, kinds=("register",))
            totals = LedgerTotals(gpu={}, jobs=jobs, records=0, head_seq=head, head_hash="")
            try:
                self._statuses[program] = evaluate_program(
                    program, job_inputs(self._ledger, totals, events, program), config)
                self._errors.pop(program, None)
            except ProgramConfigError as exc:
                self._errors[program] = str(exc)
                self._statuses.pop(program, None)
            self.evaluated += 1
        self._seq = head
        self.passes += 1
        self.view = ProgramView(MappingProxyType(dict(self._statuses)),
                                MappingProxyType(dict(self._errors)), self._clock())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpuflops-programs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a bad pass must not end the evaluations
                log.exception("program evaluation failed; will retry")
            self._wake.wait(self._period_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
