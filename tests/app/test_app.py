"""Composition root in-process: the daemon built from settings over the demo trace, backend
choice, restarts."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from gpuflops.app import build
from gpuflops.app.assemble import NoDriverError, build_sampler
from gpuflops.config import Settings, demo_trace_path
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.model import GpuInfo, GpuSample, Metric
from gpuflops.pipeline.integrate import Integrator
from gpuflops.sampler.replay import ReplaySampler
from tests.support import DEMO_TRACE, demo_trace

_HEADER, _INTERVALS, _EVENTS = demo_trace()
INFO = _HEADER.gpus[0]
EXPECTED = sum(Integrator().integrate(INFO, iv.samples[0]).total for iv in _INTERVALS)


def _replay(**kw: object) -> Settings:
    """The demo trace replayed once, as fast as it goes."""
    return Settings(backend="replay", replay_path=str(DEMO_TRACE), replay_speed=1e6,
                    replay_loop=False, listen="127.0.0.1:0").with_overrides(**kw)


def test_demo_trace_ships_in_the_package() -> None:
    assert demo_trace_path().resolve() == DEMO_TRACE.resolve()


@pytest.mark.timeout(60)
def test_daemon_runs_a_replay_to_its_end() -> None:
    d = build(_replay(ledger=False, job_socket=False))
    ready: list[bool] = []
    d.run(on_ready=lambda: ready.append(True))
    assert ready == [True]
    snap = d.totals.snapshot()
    assert sum(snap.gpu_flops.values()) == pytest.approx(EXPECTED, rel=1e-9)
    assert snap.held_intervals == 0  # flushed at the end
    assert d.sampler_stop.is_set()  # the sampler was closed


def test_build_sampler_replay_and_auto() -> None:
    s, stop = build_sampler(Settings(backend="replay"))
    assert isinstance(s, ReplaySampler) and s.path == demo_trace_path()
    s.close()
    assert stop.is_set()  # the sampler's own token
    # No NVIDIA driver on this machine: auto refuses, and says how to see a demo instead.
    with pytest.raises(NoDriverError) as ei:
        build_sampler(Settings(backend="auto"))
    assert "gpuflops daemon --demo" in str(ei.value)
    assert "will not invent numbers" in str(ei.value)


@pytest.mark.timeout(120)
class _FakeBackend:
    """Stands in for NvmlSampler / DcgmSampler in build_sampler: close() sets its stop token."""

    name = "fake"
    interval_s = 0.5

    def __init__(self, built: list[_FakeBackend], *, stop: threading.Event, measures: bool,
                 **_kw: object) -> None:
        self.stop = stop
        self.measures = measures
        self.errors: dict[tuple[str, str], int] = {}
        built.append(self)

    def gpus(self) -> list[GpuInfo]:
        metrics = frozenset(Metric) if self.measures else frozenset()
        return [replace(INFO, metrics=metrics, unavailable_reason=None if self.measures else "no")]

    def sample(self) -> list[GpuSample]:
        raise StopIteration

    def describe(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        self.stop.set()


def test_auto_closing_the_sampler_it_passes_over_leaves_the_chosen_one_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NVML without GPM, DCGM with profiling: auto picks DCGM and closes the NVML sampler. Each
    has its own stop token, so that close cannot stop the sampler the daemon runs."""
    built: list[_FakeBackend] = []
    monkeypatch.setattr("gpuflops.sampler.nvml.NvmlSampler",
                        lambda **kw: _FakeBackend(built, measures=False, **kw))
    monkeypatch.setattr("gpuflops.sampler.dcgm.sampler.DcgmSampler",
                        lambda **kw: _FakeBackend(built, measures=True, **kw))
    chosen, stop = build_sampler(Settings(backend="auto"))
    nvml, dcgm = built
    assert chosen is dcgm and stop is dcgm.stop
    assert nvml.stop.is_set()  # closed by auto
    assert not stop.is_set()


def test_restart_continues_counters_from_the_ledger(tmp_path: Path) -> None:
    settings = _replay(state_dir=str(tmp_path), job_socket=False)

    def run_once(n: int) -> float:
        d = build(settings)
        before = sum(d.totals.snapshot().gpu_flops.values())
        ticks = [0]

        def tick() -> None:
            ticks[0] += 1
            if ticks[0] >= n:
                d.stop.set()

        d.run(on_tick=tick)
        after = sum(d.totals.snapshot().gpu_flops.values())
        assert after >= before
        return after

    first = run_once(300)  # through the bf16 and fp16 phases
    assert first > 1e15
    assert (tmp_path / LEDGER_FILENAME).exists()
    # A new daemon on the same state dir starts from the ledger's totals, then keeps counting.
    d = build(settings)
    seeded = sum(d.totals.snapshot().gpu_flops.values())
    d.close()
    assert seeded == pytest.approx(first, rel=1e-9)
    second = run_once(300)
    assert second == pytest.approx(2 * first, rel=1e-9)
