"""The daemon process in one place: startup, signals, systemd notifications, reload and shutdown.

SIGTERM and SIGINT stop the daemon cleanly (the ledger gets its stop record). SIGHUP reloads:
the settings are resolved again (flags, environment, the TOML file as it is now), the web
config is read again (new TLS certificates and basic-auth users apply to new connections), the
program configuration and the log level are applied; any other changed setting is named in
the log as taking effect at the next restart. A reload that fails keeps what runs and says why.
The ledger has no record kind for a reload (session records are start/stop/alive), so a reload
is logged, not written to the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from gpuflops.app import sdnotify
from gpuflops.app.assemble import build
from gpuflops.app.daemon import Daemon
from gpuflops.config import LOG_LEVELS, Settings, SettingsError

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon could not start (a port, the socket, the program configuration); the message
    says why."""


def http_options(web_config: str | None) -> dict[str, Any]:
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
def handle_signals(
    on_signal: Callable[[], None], on_reload: Callable[[], None] | None = None
) -> Iterator[None]:
    """SIGTERM and SIGINT call ``on_signal``; the loop then finishes its interval and exits.

    SIGHUP calls ``on_reload``; without one it stops like SIGTERM (never the default action,
    which would kill the process without flushing).
    """

    def _handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP and on_reload is not None:
            log.info("received SIGHUP, reloading")
            on_reload()
            return
        log.info("received signal %d, stopping", signum)
        on_signal()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# Settings a reload applies without a restart.
LIVE_SETTINGS = frozenset({"web_config", "program_config", "log_level"})


def reload(d: Daemon, resolve: Callable[[], Settings]) -> bool:
    """Apply a SIGHUP: True when the new settings were applied, False (and logged) if not."""
    try:
        new = resolve()
        http = http_options(new.web_config)
    except (SettingsError, OSError) as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        return False
    for fn in d.reloaders:
        try:
            fn(new)
        except Exception as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return False
    if d.server is not None:
        d.server.reload(http.get("ssl_context"), http.get("auth"))
    logging.getLogger().setLevel(LOG_LEVELS.get(new.log_level, logging.INFO))
    later = [f.name for f in fields(Settings) if f.name not in LIVE_SETTINGS
             and getattr(new, f.name) != getattr(d.settings, f.name)]
    if later:
        log.warning("reload: changed settings %s take effect at the next restart", ", ".join(later))
    log.info("reloaded configuration: web config %s, programs %s, log level %s",
             new.web_config or "none", new.program_config or "none", new.log_level)
    return True


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


def run(settings: Settings, *, record: Path | None = None,
        reload_settings: Callable[[], Settings] | None = None) -> None:
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
        resolve = reload_settings or (lambda: settings)
        def on_reload() -> None:
            reload(d, resolve)

        with handle_signals(d.request_stop, on_reload):
            d.run(
                on_ready=lambda: sdnotify.notify("READY=1"),
                on_tick=lambda: watchdog(lambda: sdnotify.notify("WATCHDOG=1")),
            )
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
