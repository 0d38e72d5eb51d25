"""The pipeline in-process over the demo trace: rows per job, declared precisions, unknown units."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuflops.exporter.state import Totals
from gpuflops.model import UNATTRIBUTED
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler
from gpuflops.pipeline.pipeline import Batch, Committed, CountingSink, Pipeline
from tests.support import DemoTrace, demo_trace

_HEADER, _INTERVALS, _EVENTS = demo_trace()
INFO = _HEADER.gpus[0]
EXPECTED = sum(Integrator().integrate(INFO, iv.samples[0]).total for iv in _INTERVALS)


class RecordingSink(CountingSink):
    """Counts every settled row at once, and keeps each batch for the test."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def commit(self, batch: Batch, *, force: bool = False,
               held_from_s: float | None = None) -> Committed:
        self.batches.append(batch)
        return super().commit(batch, force=force)


def test_pipeline_end_to_end_over_the_demo_trace() -> None:
    totals = Totals([INFO])
    sink = RecordingSink()
    held: list[int] = []
    jobs = {458: ("job-a", "prog"), 1470: ("job-b", "prog")}
    p = Pipeline(
        [INFO], Integrator(), ProcessAttributor(),
        Labeler(lambda pid, _uuid: jobs.get(pid, (UNATTRIBUTED, UNATTRIBUTED))), sink, totals,
    )
    for iv in _INTERVALS:
        p.step(list(iv.samples))
        held.append(totals.snapshot().held_intervals)
    assert max(held) > 0  # shared intervals waited for util samples
    p.flush()
    snap = totals.snapshot()
    assert sum(snap.gpu_flops.values()) == pytest.approx(EXPECTED, rel=1e-9)
    assert snap.intervals == {"0": len(_INTERVALS)}
    assert snap.held_intervals == 0
    # Per job: the single-process phases are job-a's, the shared run splits between b and 1471's
    # (unresolved) pid; every FLOP lands on exactly one job.
    assert sum(snap.job_flops.values()) == pytest.approx(EXPECTED, rel=1e-9)
    integ = Integrator()
    single = sum(
        integ.integrate(INFO, s).total
        for iv in _INTERVALS
        for s in iv.samples
        if [p.pid for p in s.processes] == [458]
    )
    assert snap.job_flops[("job-a", "prog")] == pytest.approx(single, rel=1e-9)
    assert snap.job_flops[("job-b", "prog")] > 0
    assert snap.job_flops[(UNATTRIBUTED, UNATTRIBUTED)] > 0  # pid 1471 has no job
    rows = [r for b in sink.batches for _a, _b, rs in b for r in rs]
    assert {r.uuid for r in rows} == {INFO.uuid}
    assert all(r.flops > 0 for r in rows)


def test_pipeline_uses_the_jobs_declared_precision() -> None:
    (fp8,) = [e.data for e in _EVENTS if e.data.get("name") == "fp8"]
    window = [iv.samples[0] for iv in _INTERVALS if fp8["t0"] - 1 < iv.t0_s < fp8["t1"] + 1]

    def run(declared: str | None) -> float:
        totals = Totals([INFO])
        p = Pipeline(
            [INFO], Integrator(), ProcessAttributor(),
            Labeler(lambda _pid, _uuid: ("job", "prog"), lambda _j, _p: declared), CountingSink(), totals,
        )
        for s in window:
            p.step([s])
        p.flush()
        return sum(totals.snapshot().gpu_flops.values())

    assert run("fp8") / fp8["flops"] == pytest.approx(1.0, abs=0.025)
    assert run(None) / fp8["flops"] == pytest.approx(0.51, abs=0.02)  # configured bf16
    assert run("int4") == run(None)  # unknown precision: the configured one stands


def test_samples_for_unknown_units_are_ignored(
    demo: DemoTrace, caplog: pytest.LogCaptureFixture
) -> None:
    totals = Totals([INFO])
    p = Pipeline([INFO], Integrator(), ProcessAttributor(), Labeler(), CountingSink(), totals)
    s = demo[1][0].samples[0]
    p.step([replace(s, key="9"), s])
    assert totals.snapshot().intervals == {"0": 1}
    assert "unknown unit '9'" in caplog.text
