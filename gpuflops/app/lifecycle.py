"""The daemon process in one place: startup, signals, systemd notifications and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gpuflops.app import sdnotify
from gpuflops.app.assemble import build
from gpuflops.config import Settings, SettingsError

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon could not start (a port, the socket, the program configuration); the message
    says why."""


def http_options(web_config: str | None) -> dict[str, object]:
    """TLS and basic auth for /metrics from a web-config file; SettingsError when unusable."""
    if web_config is None:
        return {}
    from gpuflops.exporter.webconfig import WebConfigError, load_web_config

    try:
        wc = load_web_config(Path(web_config))
        return {"ssl_context": wc.ssl_context(), "auth": wc.check_auth if wc.auth_required else None}
    except WebConfigError as e:
        raise SettingsError(str(e)) from None


@contextlib.contextmanager
def handle_signals(on_signal: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call ``on_signal``; the loop then finishes its interval and exits."""

    def _handler(signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        on_signal()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Throttle:
    """Calls through at most once per ``period_s`` (the systemd watchdog)."""

    def __init__(self, period_s: float) -> None:
        self._period = period_s
        self._next = 0.0

    def __call__(self, fn: object) -> None:
        now = time.monotonic()
        if now >= self._next and callable(fn):
            self._next = now + self._period
            fn()


def run(settings: Settings, *, record: Path | None = None) -> None:
    """Build the daemon, serve, and sample until a signal or the end of a replayed trace.

    Raises SettingsError (web config), SamplerError (no sampler: nothing was started) or
    StartupError; once running, shutdown always flushes, commits and closes.
    """
    http = http_options(settings.web_config)
    try:
        d = build(settings, record=record)
    except (OSError, ValueError, RuntimeError) as e:
        raise StartupError(f"cannot start: {e}") from None
    try:
        d.serve(**http)
    except (OSError, ValueError, RuntimeError) as e:
        d.close()
        raise StartupError(f"cannot start: {e}") from None
    watchdog = Throttle(5.0)
    profile_path = os.environ.get("GPUFLOPS_PROFILE")  # benchmarks/daemon_profile.py sets it
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        with handle_signals(d.request_stop):
            d.run(
                on_ready=lambda: sdnotify.notify("READY=1"),
                on_tick=lambda: watchdog(lambda: sdnotify.notify("WATCHDOG=1")),
            )
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
