"""Pipeline wiring of jobs: declared HMMA precision per job, rows per job, ledger-first counters."""

from __future__ import annotations

import time
from pathlib import Path

from gpuflops.exporter.state import Totals
from gpuflops.ledger.records import JobKey
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler
from gpuflops.pipeline.pipeline import CountingSink, Pipeline
from tests.support import demo_trace


def _run(resolve, declared_precision, limit=400):  # type: ignore[no-untyped-def]
    header, intervals, _ = demo_trace()
    gpus = list(header.gpus)
    totals = Totals(gpus)
    p = Pipeline(gpus, Integrator(), ProcessAttributor(), Labeler(resolve, declared_precision),
                 CountingSink(), totals)
    for iv in intervals[:limit]:
        p.step(list(iv.samples))
    p.flush()
    return totals.snapshot()


def test_declared_precision_of_the_only_job_sets_the_hmma_rate() -> None:
    bf16 = _run(lambda pid, _uuid: ("j", "p"), lambda j, p: "bf16")
    fp8 = _run(lambda pid, _uuid: ("j", "p"), lambda j, p: "fp8")
    hb = sum(v for (g, pipe, prec), v in bf16.gpu_flops.items() if pipe == "hmma")
    as_fp8 = fp8.gpu_flops[("0", "hmma", "fp8")]
    # Intervals in which no process was listed yet keep the configured precision.
    left_bf16 = fp8.gpu_flops.get(("0", "hmma", "bf16"), 0.0)
    assert hb > 1e15
    assert as_fp8 > 0.95 * 2 * hb
    assert abs(as_fp8 / 2 + left_bf16 - hb) < 1e-9 * hb  # FP8 is twice the BF16 rate on Hopper
    assert fp8.job_flops[("j", "p")] > 0


def test_the_labeler_is_asked_with_the_unit_the_work_ran_on() -> None:
    asked: set[str] = set()

    def resolve(pid: int, uuid: str) -> tuple[str, str]:
        asked.add(uuid)  # PodResources maps this unit to a pod (docs/attribution.md)
        return "j", "p"

    _run(resolve, lambda j, p: "bf16")
    assert asked == {g.uuid for g in demo_trace()[0].gpus}


def _shared_run(declared: dict[str, str]) -> set[str]:
    header, intervals, _ = demo_trace()
    shared = [iv for iv in intervals if len(iv.samples[0].processes) > 1]
    assert shared, "the demo trace has a two-process phase"
    pids = [p.pid for p in shared[0].samples[0].processes]
    jobs = {pids[0]: ("a", "p"), pids[1]: ("b", "p")}
    gpus = list(header.gpus)
    totals = Totals(gpus)
    p = Pipeline(gpus, Integrator(), ProcessAttributor(),
                 Labeler(lambda pid, _uuid: jobs.get(pid, ("unattributed", "unattributed")),
                         lambda j, _p: declared.get(j)),
                 CountingSink(), totals)
    for iv in shared:
        p.step(list(iv.samples))
    p.flush()
    return {prec for (_g, pipe, prec), v in totals.snapshot().gpu_flops.items()
            if pipe == "hmma" and v > 0}


def test_jobs_sharing_a_gpu_use_their_precision_only_when_they_agree() -> None:
    assert _shared_run({"a": "fp8", "b": "tf32"}) == {"bf16"}  # disagree: configured default
    assert _shared_run({"a": "fp8", "b": "fp8"}) == {"fp8"}


def test_counters_rise_only_with_what_the_ledger_committed(tmp_path: Path) -> None:
    header, intervals, _ = demo_trace()
    ledger = Ledger.open(tmp_path / "l.sqlite3", clock=time.time, synchronous="NORMAL")
    totals = Totals(list(header.gpus))
    sink = LedgerSink(ledger)
    snap = None
    try:
        p = Pipeline(list(header.gpus), Integrator(), ProcessAttributor(),
                     Labeler(lambda _pid, _uuid: ("j", "p")), sink, totals)
        for iv in intervals[:300]:
            p.step(list(iv.samples))
        p.flush()
        snap = totals.snapshot()
        persisted = ledger.totals()
    finally:
        ledger.close()
    exported = sum(snap.gpu_flops.values())
    durable = sum(persisted.gpu.values())
    assert exported > 1e15
    assert abs(exported - durable) <= 1e-9 * durable
    assert abs(snap.job_flops[("j", "p")] - persisted.jobs[JobKey("j", "p")].measured_flops) < 1e3

    # A new process seeds from the ledger and continues from there.
    ledger = Ledger.open(tmp_path / "l.sqlite3", clock=time.time, synchronous="NORMAL")
    try:
        again = Totals(list(header.gpus), seed=ledger.totals())
        seeded = again.snapshot()
        # Bit-identical, per series: a value one rounding step lower would read as a counter
        # reset in Prometheus and be counted again in full.
        assert dict(seeded.gpu_flops) == dict(snap.gpu_flops)
        assert dict(seeded.job_flops) == dict(snap.job_flops)
    finally:
        ledger.close()
