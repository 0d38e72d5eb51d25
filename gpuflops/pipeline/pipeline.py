"""The pipeline: one sampling step from samples to committed, counted rows.

sampler samples -> integrate -> attribute -> label -> sink (the ledger) -> counters. Every stage
is passed to the constructor and none is replaced afterwards. The sink returns what it made
durable (:class:`Committed`) and the pipeline raises the counters with it, so the counters
(exporter/state.py) are written from here only and never run ahead of the durable record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpuflops.model import AttributedInterval, FlopsRow, GpuInfo, GpuSample, IntervalFlops
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler

log = logging.getLogger(__name__)

Batch = list[tuple[float, float, list[FlopsRow]]]  # (t0_s, t1_s, rows) of each settled interval
StepHook = Callable[[list[GpuSample]], None]


@dataclass(frozen=True)
class CommittedEstimate:
    """Analytic work a job reported, now durable."""

    job: str
    program: str
    flops: float
    tokens: float
    recompute_flops: float


@dataclass(frozen=True)
class Committed:
    """What one commit made durable, for the pipeline to count.

    ``rows``: batches of rows, each counted in one go so the counters sum as the ledger does (a
    restart seeded from the ledger then continues bit-identically). An empty batch still moves
    the held-interval gauge; no batch at all (a failed write keeps its rows pending) leaves the
    counters as they are. ``refused``: kinds of records the ledger refused (``ledger_bad_row``).
    """

    rows: tuple[tuple[FlopsRow, ...], ...] = ((),)
    estimates: tuple[CommittedEstimate, ...] = ()
    refused: tuple[str, ...] = ()


class Sink(Protocol):
    """Where settled rows go to become durable (gpuflops/ledger/sink.py)."""

    def commit(self, batch: Batch, *, force: bool = False,
               held_from_s: float | None = None) -> Committed:
        """Make ``batch`` (and whatever else is queued) durable, now or at the next cadence.

        ``held_from_s``: the start of the oldest interval still held for attribution (None:
        none), so the ledger can say until when it is complete."""
        ...

    def on_gap(self, gpu: str, uuid: str, t0_s: float, t1_s: float, reason: str) -> None:
        """An interval of ``gpu`` could not be measured."""
        ...

    def close(self) -> Committed:
        """Commit what is pending, then close; returns that last commit."""
        ...


class Counters(Protocol):
    """The live counters the pipeline raises (gpuflops/exporter/state.py)."""

    def record_live(self, sample: GpuSample, flops: IntervalFlops) -> None: ...

    def add_rows(self, rows: Iterable[FlopsRow], held: int) -> None: ...

    def add_estimate(
        self, job: str, program: str, flops: float, tokens: float, recompute: float
    ) -> None: ...

    def count_errors(self, errors: Mapping[tuple[str, str], int]) -> None: ...

    def count_error(self, gpu: str, kind: str) -> None: ...


def count_committed(counters: Counters, committed: Committed, held: int) -> None:
    """Raise ``counters`` by what a commit made durable."""
    for e in committed.estimates:
        counters.add_estimate(e.job, e.program, e.flops, e.tokens, e.recompute_flops)
    for kind in committed.refused:
        counters.count_error("*", kind)
    for rows in committed.rows:
        counters.add_rows(rows, held)


class CountingSink:
    """A sink without persistence: every settled row counts at once (tests, benchmarks)."""

    def commit(self, batch: Batch, *, force: bool = False,
               held_from_s: float | None = None) -> Committed:
        return Committed(rows=(tuple(r for _t0, _t1, rows in batch for r in rows),))

    def on_gap(self, gpu: str, uuid: str, t0_s: float, t1_s: float, reason: str) -> None:
        return None

    def close(self) -> Committed:
        return Committed(rows=())


class Pipeline:
    """One sampling step end to end; usable without threads (tests, benchmarks)."""

    def __init__(
        self,
        gpus: Sequence[GpuInfo],
        integrator: Integrator,
        attributor: ProcessAttributor,
        labeler: Labeler,
        sink: Sink,
        counters: Counters,
        *,
        recorders: Sequence[StepHook] = (),
    ) -> None:
        self.gpus = list(gpus)
        self.integrator = integrator
        self.attributor = attributor
        self._labeler = labeler
        self._sink = sink
        self._counters = counters
        self._recorders = tuple(recorders)  # every step's samples (trace recording)
        self._infos = {g.key: g for g in self.gpus}

    def step(self, samples: list[GpuSample]) -> None:
        settled: list[AttributedInterval] = []
        for s in samples:
            info = self._infos.get(s.key)
            if info is None:
                log.warning("sample for unknown unit %r ignored", s.key)
                continue
            flops = self.integrator.integrate(info, s, self._labeler.hmma_precision(s, info.uuid))
            self._counters.record_live(s, flops)
            if flops.gap_reason is not None:
                self._sink.on_gap(info.key, info.uuid, flops.t0_s, flops.t1_s, flops.gap_reason)
            settled.extend(self.attributor.add(s, flops))
        for hook in self._recorders:
            hook(samples)
        self._settle(settled)

    def flush(self) -> None:
        """Settle every interval still held (shutdown)."""
        self._settle(self.attributor.flush())

    def count_sampler_errors(self, errors: Mapping[tuple[str, str], int]) -> None:
        """Take the backend's cumulative error counters."""
        if errors:
            self._counters.count_errors(errors)

    def close(self) -> None:
        """The sink's last commit, counted; then the sink is closed."""
        count_committed(self._counters, self._sink.close(), 0)

    def _settle(self, settled: list[AttributedInterval]) -> None:
        batch: Batch = []
        for item in settled:
            rows = self._labeler.rows(item, self._infos[item.key].uuid)
            if rows:
                batch.append((item.t0_s, item.t1_s, rows))
        held = self.attributor.held()
        committed = self._sink.commit(batch, held_from_s=self.attributor.held_from())
        count_committed(self._counters, committed, held)
