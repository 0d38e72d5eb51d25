"""Composition root: the only place that builds real objects and wires the pipeline.

sampler -> integrator -> attribution -> (ledger) -> totals -> exporter
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector, CollectorRegistry

from gpuflops.attribution.process import AttributedInterval, ProcessAttributor
from gpuflops.config import Settings
from gpuflops.exporter.collector import FlopsCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.integrate.integrator import Integrator, IntervalFlops
from gpuflops.model import GpuInfo, GpuSample
from gpuflops.sampler import Sampler, SamplerError
from gpuflops.totals import Totals

log = logging.getLogger(__name__)

DEMO_TRACE = "h100-demo.jsonl.gz"

IntervalHook = Callable[[GpuSample, IntervalFlops], None]
AttributedHook = Callable[[list[tuple[AttributedInterval, list[tuple[str, str, int | None]]]]], None]


class NoDriverError(SamplerError):
    """``--backend auto`` found no usable NVIDIA driver."""


def demo_trace_path() -> Path:
    """The H100 trace shipped in the package."""
    return Path(str(resources.files("gpuflops") / "data" / DEMO_TRACE))


def build_sampler(settings: Settings, stop: threading.Event) -> Sampler:
    """The configured backend. ``auto`` never falls back to a replay silently."""
    if settings.backend == "replay":
        from gpuflops.sampler.replay import ReplaySampler

        path = Path(settings.replay_path) if settings.replay_path else demo_trace_path()
        return ReplaySampler(path, speed=settings.replay_speed, loop=settings.replay_loop, stop=stop)
    from gpuflops.sampler.nvml import NvmlSampler

    try:
        return NvmlSampler(
            interval_s=settings.interval_s,
            clock_period_s=settings.clock_period_s,
            process_period_s=settings.process_period_s,
            stop=stop,
            devices=list(settings.devices) if settings.devices is not None else None,
        )
    except SamplerError as e:
        if settings.backend == "auto":
            raise NoDriverError(
                f"no usable NVIDIA GPU found: {e}\n"
                "gpuflops measures real GPUs only and will not invent numbers. To see it work "
                "on this machine, run `gpuflops daemon --demo`, which replays a trace recorded "
                "on an NVIDIA H100."
            ) from None
        raise


@dataclass
class Pipeline:
    """One sampling step end to end; usable without threads (tests, benchmarks)."""

    gpus: list[GpuInfo]
    integrator: Integrator
    attributor: ProcessAttributor
    totals: Totals
    on_interval: list[IntervalHook] = field(default_factory=list)
    on_attributed: list[AttributedHook] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._infos = {g.key: g for g in self.gpus}

    def step(self, samples: list[GpuSample]) -> None:
        settled: list[AttributedInterval] = []
        for s in samples:
            info = self._infos.get(s.key)
            if info is None:
                log.warning("sample for unknown unit %r ignored", s.key)
                continue
            flops = self.integrator.integrate(info, s)
            self.totals.record_interval(s, flops)
            for hook in self.on_interval:
                hook(s, flops)
            settled.extend(self.attributor.add(s, flops))
        self._settle(settled)

    def flush(self) -> None:
        self._settle(self.attributor.flush())

    def _settle(self, settled: list[AttributedInterval]) -> None:
        done = self.totals.record_attributed(settled, self.attributor.held())
        if done:
            for hook in self.on_attributed:
                hook(done)


class Daemon:
    """Runs the sampling loop in the calling thread and the HTTP endpoint in another."""

    def __init__(
        self,
        settings: Settings,
        sampler: Sampler,
        *,
        stop: threading.Event,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.stop = stop
        self.clock = clock
        gpus = sampler.gpus()
        per_gpu = dict(settings.hmma_precision_per_gpu)
        self.integrator = Integrator(lambda key: per_gpu.get(key, settings.hmma_precision))
        self.totals = Totals(gpus, process_ttl_s=settings.process_ttl_s, clock=clock)
        self.pipeline = Pipeline(
            gpus, self.integrator, ProcessAttributor(settings.attribution_hold_s), self.totals
        )
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.registry.register(FlopsCollector(self.totals.snapshot, sampler.name))
        self._last_loop_s: float | None = None
        self._started_s = clock()
        self.server: MetricsServer | None = None
        self._closers: list[Callable[[], None]] = []
        for g in gpus:
            if not g.metrics:
                log.warning(
                    "gpu %s (%s): %s. gpuflops exports what NVML offers for it and counts no "
                    "FLOPs; gpuflops_gpu_tensor_activity_available is 0.",
                    g.key,
                    g.name,
                    g.unavailable_reason,
                )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def add_closer(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def health(self) -> tuple[bool, str]:
        now = self.clock()
        limit = max(5.0, 10 * self.settings.interval_s)
        if self._last_loop_s is None:
            if now - self._started_s < limit:
                return True, "starting"
            return False, "no sampling interval completed yet"
        age = now - self._last_loop_s
        if age > limit:
            return False, f"sampling loop stalled: last interval {age:.1f}s ago"
        return True, "ok"

    def serve(self, **http_kwargs: Any) -> None:
        self.server = MetricsServer(self.registry, self.settings.listen, self.health, **http_kwargs)
        self.server.start()
        log.info("serving /metrics on %s (port %d)", self.settings.listen, self.server.port)

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Sample until stopped or the source ends; always flushes and closes."""
        ready = False
        try:
            while not self.stop.is_set():
                try:
                    samples = self.sampler.sample()
                except StopIteration:
                    break
                self.pipeline.step(samples)
                errors = getattr(self.sampler, "errors", None)
                if errors:
                    self.totals.count_errors(errors)
                self._last_loop_s = self.clock()
                if not ready and on_ready is not None:
                    on_ready()
                    ready = True
        finally:
            self.pipeline.flush()
            self.close()

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("error during shutdown")
        self._closers.clear()
        self.sampler.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


@contextlib.contextmanager
def handle_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``; the loop then finishes its interval and exits."""

    def _handler(signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
