"""Composition root in-process: Pipeline and Daemon over the demo trace, backend choice, restarts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gpuflops.app.build import Daemon, NoDriverError, Pipeline, build_sampler, wire_jobs
from gpuflops.config import Settings, demo_trace_path
from gpuflops.exporter.state import Totals
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.model import UNATTRIBUTED, FlopsRow
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.replay import ReplaySampler
from gpuflops.sampler.trace import load_trace

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "gpuflops" / "data" / "h100-demo.jsonl.gz"
_HEADER, _INTERVALS, _EVENTS = load_trace(DEMO)
INFO = _HEADER.gpus[0]
EXPECTED = sum(Integrator().integrate(INFO, iv.samples[0]).total for iv in _INTERVALS)


def test_demo_trace_ships_in_the_package() -> None:
    assert demo_trace_path().resolve() == DEMO.resolve()


def test_pipeline_end_to_end_over_the_demo_trace() -> None:
    totals = Totals([INFO])
    batches: list[tuple[list[tuple[float, float, list[FlopsRow]]], int]] = []

    def sink(batch: list[tuple[float, float, list[FlopsRow]]], held: int) -> None:
        batches.append((batch, held))
        totals.add_rows((r for _a, _b, rows in batch for r in rows), held)

    jobs = {458: ("job-a", "prog"), 1470: ("job-b", "prog")}
    p = Pipeline(
        [INFO], Integrator(), ProcessAttributor(), totals,
        resolve_job=lambda pid: jobs.get(pid, (UNATTRIBUTED, UNATTRIBUTED)), sink=sink,
    )
    for iv in _INTERVALS:
        p.step(list(iv.samples))
    assert max(held for _b, held in batches) > 0  # shared intervals waited for util samples
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
    rows = [r for b, _h in batches for _a, _b, rs in b for r in rs]
    assert {r.uuid for r in rows} == {INFO.uuid}
    assert all(r.flops > 0 for r in rows)


def test_pipeline_uses_the_jobs_declared_precision() -> None:
    (fp8,) = [e.data for e in _EVENTS if e.data.get("name") == "fp8"]
    window = [iv.samples[0] for iv in _INTERVALS if fp8["t0"] - 1 < iv.t0_s < fp8["t1"] + 1]

    def run(declared: str | None) -> float:
        totals = Totals([INFO])
        p = Pipeline(
            [INFO], Integrator(), ProcessAttributor(), totals,
            resolve_job=lambda _pid: ("job", "prog"), precision_of=lambda _j, _p: declared,
        )
        for s in window:
            p.step([s])
        p.flush()
        return sum(totals.snapshot().gpu_flops.values())

    assert run("fp8") / fp8["flops"] == pytest.approx(1.0, abs=0.025)
    assert run(None) / fp8["flops"] == pytest.approx(0.51, abs=0.02)  # configured bf16
    assert run("int4") == run(None)  # unknown precision: the configured one stands


def test_samples_for_unknown_units_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    totals = Totals([INFO])
    p = Pipeline([INFO], Integrator(), ProcessAttributor(), totals)
    from dataclasses import replace

    s = _INTERVALS[0].samples[0]
    p.step([replace(s, key="9"), s])
    assert totals.snapshot().intervals == {"0": 1}
    assert "unknown unit '9'" in caplog.text


def test_daemon_runs_a_replay_to_its_end() -> None:
    stop = threading.Event()
    sampler = ReplaySampler(DEMO, speed=1e6, stop=stop)
    d = Daemon(Settings(), sampler, stop=stop)
    ready: list[bool] = []
    d.run(on_ready=lambda: ready.append(True))
    assert ready == [True]
    snap = d.totals.snapshot()
    assert sum(snap.gpu_flops.values()) == pytest.approx(EXPECTED, rel=1e-9)
    assert snap.held_intervals == 0  # flushed at the end
    assert stop.is_set()  # the sampler was closed


def test_build_sampler_replay_and_auto() -> None:
    stop = threading.Event()
    s = build_sampler(Settings(backend="replay"), stop)
    assert isinstance(s, ReplaySampler) and s.path == demo_trace_path()
    s.close()
    # No NVIDIA driver on this machine: auto refuses, and says how to see a demo instead.
    with pytest.raises(NoDriverError) as ei:
        build_sampler(Settings(backend="auto"), stop)
    assert "gpuflops daemon --demo" in str(ei.value)
    assert "will not invent numbers" in str(ei.value)


def test_restart_continues_counters_from_the_ledger(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path), job_socket=False, listen="127.0.0.1:0")

    def run_once(n: int) -> float:
        stop = threading.Event()
        d = Daemon(settings, ReplaySampler(DEMO, speed=1e6, stop=stop), stop=stop)
        wire_jobs(d, socket=False)
        before = sum(d.totals.snapshot().gpu_flops.values())
        ticks = [0]

        def tick() -> None:
            ticks[0] += 1
            if ticks[0] >= n:
                stop.set()

        d.run(on_tick=tick)
        after = sum(d.totals.snapshot().gpu_flops.values())
        assert after >= before
        return after

    first = run_once(300)  # through the bf16 and fp16 phases
    assert first > 1e15
    assert (tmp_path / LEDGER_FILENAME).exists()
    # A new daemon on the same state dir starts from the ledger's totals, then keeps counting.
    stop = threading.Event()
    d = Daemon(settings, ReplaySampler(DEMO, speed=1e6, stop=stop), stop=stop)
    wire_jobs(d, socket=False)
    seeded = sum(d.totals.snapshot().gpu_flops.values())
    d.close()
    assert seeded == pytest.approx(first, rel=1e-9)
    second = run_once(300)
    assert second == pytest.approx(2 * first, rel=1e-9)
