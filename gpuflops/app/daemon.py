"""The running daemon: the sampling loop in the calling thread, the endpoints in others."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.registry import CollectorRegistry

from gpuflops.config import Settings
from gpuflops.exporter.http import MetricsServer
from gpuflops.exporter.state import Totals
from gpuflops.pipeline.pipeline import Pipeline
from gpuflops.sampler.base import Sampler

log = logging.getLogger(__name__)

Periodic = tuple[float, Callable[[], None]]  # (period_s, task) run on the sampling thread
Reloader = Callable[[Settings], object]  # applies what a SIGHUP's new settings change live


class Daemon:
    """Everything :func:`gpuflops.app.build` made, run as one loop; built once, never rewired.

    ``stop`` ends the loop; ``sampler_stop`` is the sampler's own token (set on close, or by
    :meth:`request_stop` so a sampler waiting out an interval wakes up at once). ``closers`` run
    last-given first when the daemon closes.
    """

    def __init__(
        self,
        settings: Settings,
        sampler: Sampler,
        pipeline: Pipeline,
        totals: Totals,
        registry: CollectorRegistry,
        *,
        stop: threading.Event,
        sampler_stop: threading.Event,
        clock: Callable[[], float] = time.time,
        periodic: Sequence[Periodic] = (),
        closers: Sequence[Callable[[], None]] = (),
        reloaders: Sequence[Reloader] = (),
        checks: Sequence[Callable[[], str | None]] = (),
        starters: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.pipeline = pipeline
        self.totals = totals
        self.registry = registry
        self.stop = stop
        self.sampler_stop = sampler_stop
        self.clock = clock
        self._periodic = list(periodic)
        self._next_periodic = [0.0] * len(self._periodic)
        self._closers = list(closers)
        self.reloaders = list(reloaders)
        self._checks = list(checks)
        # Run just before the first sample: the ledger's session start, so that the downtime
        # gap it writes ends where measurement begins.
        self._starters = list(starters)  # each returns what is wrong, or None (the ledger's writes)
        self._last_loop_s: float | None = None
        self._started_s = clock()
        self.server: MetricsServer | None = None

    def request_stop(self) -> None:
        """Finish the current interval and stop (signal handlers call this)."""
        self.stop.set()
        self.sampler_stop.set()

    def health(self) -> tuple[bool, str]:
        for check in self._checks:
            problem = check()
            if problem is not None:
                return False, problem
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
        self.server = MetricsServer(self.registry, self.settings.listen, self.health,
                                    telemetry_path=self.settings.telemetry_path, **http_kwargs)
        self.server.start()
        log.info("serving %s on %s (port %d)", self.settings.telemetry_path, self.settings.listen,
                 self.server.port)

    def run(
        self,
        on_ready: Callable[[], object] | None = None,
        on_tick: Callable[[], object] | None = None,
    ) -> None:
        """Sample until stopped or the source ends; always flushes and closes."""
        ready = False
        try:
            for start in self._starters:
                start()
            while not self.stop.is_set():
                try:
                    samples = self.sampler.sample()
                except StopIteration:
                    break
                self.pipeline.step(samples)
                self.pipeline.count_sampler_errors(self.sampler.errors)
                self._run_periodic()
                self._last_loop_s = self.clock()
                if on_tick is not None:
                    on_tick()
                if not ready and on_ready is not None:
                    on_ready()
                    ready = True
        finally:
            self.pipeline.flush()
            self.close()

    def _run_periodic(self) -> None:
        now = self.clock()
        for i, (period, fn) in enumerate(self._periodic):
            if now >= self._next_periodic[i]:
                self._next_periodic[i] = now + period
                try:
                    fn()
                except Exception:
                    log.exception("periodic task failed; will retry")

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
