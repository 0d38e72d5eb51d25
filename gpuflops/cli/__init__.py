"""Command line: thin click commands over the daemon and the library."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gpuflops import __version__
from gpuflops.config import ConfigError, Settings, load_settings
from gpuflops.sampler.base import SamplerError

if TYPE_CHECKING:  # psycopg is an optional dependency: imported only with --central
    from gpuflops.ledger.central import CentralConfig

log = logging.getLogger("gpuflops")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group()
@click.version_option(__version__, prog_name="gpuflops")
def main() -> None:
    """gpuflops: FLOPs executed by GPUs, measured from hardware counters."""


@main.command()
@click.option("--backend", type=click.Choice(["auto", "nvml", "dcgm", "replay"]), default=None)
@click.option("--dcgm-endpoint", default=None, help="DCGM host engine: host:port, unix:///path or embedded.")
@click.option("--dcgm-bindings", multiple=True, help="Directory of DCGM's Python bindings (repeatable).")
@click.option("--demo", is_flag=True, help="Replay the H100 trace shipped with gpuflops (no GPU needed).")
@click.option("--replay", "replay_path", type=click.Path(dir_okay=False), default=None,
              help="Trace to replay (implies --backend replay).")
@click.option("--speed", type=float, default=None,
              help="Replay speed factor (above 1, sample timestamps run ahead of the wall clock).")
@click.option("--no-loop", is_flag=True, help="Stop when the replayed trace ends.")
@click.option("--listen", default=None, help="HOST:PORT for /metrics and /healthz [0.0.0.0:9450].")
@click.option("--interval", "interval_s", type=float, default=None, help="GPM interval in seconds [0.5].")
@click.option("--precision", "hmma_precision", default=None,
              help="Assumed tensor-core (HMMA) precision: fp8, bf16, fp16, tf32 [bf16].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--record", "record_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every interval to this trace file.")
@click.option("--socket", "socket_path", default=None, help="Job socket path [/run/gpuflops/gpuflops.sock].")
@click.option("--socket-group", default=None, help="Group (name or gid) that may use the job socket.")
@click.option("--no-socket", is_flag=True, help="Do not open the job socket.")
@click.option("--state-dir", default=None, help="Ledger directory [/var/lib/gpuflops].")
@click.option("--no-ledger", is_flag=True, help="Run without the persistent ledger (counters restart at 0).")
@click.option("--programs", "program_config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Program thresholds and policy (TOML, docs/ledger.md).")
@click.option("--web-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TLS and basic auth for /metrics (Prometheus exporter-toolkit format).")
@click.option("--kubelet-url", default=None,
              help="Kubelet /pods URL for pod names, e.g. https://$NODE_IP:10250/pods.")
@click.option("--kubelet-ca", "kubelet_ca_file", default=None, help="CA bundle for the kubelet's TLS.")
@click.option("--kubelet-insecure-tls", is_flag=True, help="Do not verify the kubelet's certificate.")
@click.option("--central", "central_url", default=None, metavar="URL",
              help="Ship the ledger to this PostgreSQL (libpq URL, no password; docs/fleet.md).")
@click.option("--central-password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the central store's password (else PGPASSWORD / PGPASSFILE).")
@click.option("--node-name", default=None, help="This node's name in the central store [host name].")
@click.option("--cluster", default=None, help="This node's cluster in the central store [default].")
@click.option("-v", "--verbose", count=True)
def daemon(
    backend: str | None,
    dcgm_endpoint: str | None,
    dcgm_bindings: tuple[str, ...],
    demo: bool,
    replay_path: str | None,
    speed: float | None,
    no_loop: bool,
    listen: str | None,
    interval_s: float | None,
    hmma_precision: str | None,
    config_path: str | None,
    record_path: str | None,
    socket_path: str | None,
    socket_group: str | None,
    no_socket: bool,
    state_dir: str | None,
    no_ledger: bool,
    program_config: str | None,
    web_config: str | None,
    kubelet_url: str | None,
    kubelet_ca_file: str | None,
    kubelet_insecure_tls: bool,
    central_url: str | None,
    central_password_file: str | None,
    node_name: str | None,
    cluster: str | None,
    verbose: int,
) -> None:
    """Run the metering daemon."""
    from gpuflops.app import sdnotify
    from gpuflops.app.build import Daemon, build_sampler, handle_signals, wire_jobs

    _setup_logging(verbose)
    try:
        settings = load_settings(Path(config_path) if config_path else None)
        if demo or replay_path:
            if backend not in (None, "replay"):
                raise ConfigError("--demo/--replay cannot be combined with --backend " + backend)
            backend = "replay"
        settings = settings.with_overrides(
            backend=backend,
            listen=listen,
            interval_s=interval_s,
            hmma_precision=hmma_precision,
            replay_path=replay_path,
            replay_speed=speed,
            replay_loop=False if no_loop else None,
            socket_path=socket_path,
            socket_group=socket_group,
            job_socket=False if no_socket else None,
            state_dir=state_dir,
            ledger=False if no_ledger else None,
            program_config=program_config,
            web_config=web_config,
            dcgm_endpoint=dcgm_endpoint,
            kubelet_url=kubelet_url,
            kubelet_ca_file=kubelet_ca_file,
            kubelet_insecure_tls=True if kubelet_insecure_tls else None,
            dcgm_bindings=dcgm_bindings or None,
            central_url=central_url,
            central_password_file=central_password_file,
            node_name=node_name,
            cluster=cluster,
        ).validate()
        http_kwargs = _web_config(settings.web_config)
        central = _central_config(settings)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    stop = threading.Event()
    try:
        sampler = build_sampler(settings, stop)
    except SamplerError as e:
        click.echo(f"gpuflops: {e}", err=True)
        sys.exit(2)
    d = Daemon(settings, sampler, stop=stop)
    if record_path:
        _attach_recorder(d, Path(record_path))
    try:
        if central is not None:
            from gpuflops.app.central import wire_central

            wire_central(d, central)  # before wire_jobs: its final round follows the last commit
        wire_jobs(d, socket=settings.job_socket)
        d.serve(**http_kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        d.close()
        raise click.ClickException(f"cannot start: {e}") from None
    watchdog = _Throttle(5.0)
    profile_path = os.environ.get("GPUFLOPS_PROFILE")  # benchmarks/daemon_profile.py sets it
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        with handle_signals(stop):
            d.run(
                on_ready=lambda: sdnotify.notify("READY=1"),
                on_tick=lambda: watchdog(lambda: sdnotify.notify("WATCHDOG=1")),
            )
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)


class _Throttle:
    def __init__(self, period_s: float) -> None:
        self._period = period_s
        self._next = 0.0

    def __call__(self, fn: object) -> None:
        now = time.monotonic()
        if now >= self._next and callable(fn):
            self._next = now + self._period
            fn()


def _central_config(settings: Settings) -> CentralConfig | None:
    if not settings.central_url:
        return None
    from gpuflops.ledger.central import CentralConfig, CentralError

    pw = Path(settings.central_password_file) if settings.central_password_file else None
    try:
        return CentralConfig.from_options(settings.central_url, pw)
    except CentralError as e:
        raise ConfigError(str(e)) from None


def _web_config(path: str | None) -> dict[str, object]:
    if path is None:
        return {}
    from gpuflops.exporter.webconfig import WebConfigError, load_web_config

    try:
        wc = load_web_config(Path(path))
        return {"ssl_context": wc.ssl_context(), "auth": wc.check_auth if wc.auth_required else None}
    except WebConfigError as e:
        raise ConfigError(str(e)) from None


def _trace_meta(sampler: object) -> dict[str, object]:
    """Trace header facts: when, which backend, and what the backend says of the host."""
    meta: dict[str, object] = {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": getattr(sampler, "name", "unknown"),
    }
    describe = getattr(sampler, "describe", None)
    if callable(describe):
        meta.update(describe())
    return meta


def _attach_recorder(d: object, path: Path) -> None:
    from gpuflops.app.build import Daemon
    from gpuflops.sampler.trace import TraceWriter

    assert isinstance(d, Daemon)
    writer = TraceWriter(
        path, d.sampler.gpus(), getattr(d.sampler, "interval_s", None), _trace_meta(d.sampler)
    )
    d.pipeline.on_step.append(writer.interval)
    d.add_closer(writer.close)


@main.command()
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Trace file to write (.jsonl or .jsonl.gz).")
@click.option("--seconds", type=float, required=True, help="How long to record.")
@click.option("--interval", "interval_s", type=float, default=0.1, show_default=True,
              help="GPM interval; recordings use the finest NVML allows.")
@click.option("--clock-period", "clock_period_s", type=float, default=0.02, show_default=True)
def record(out: str, seconds: float, interval_s: float, clock_period_s: float) -> None:
    """Record a trace from the NVML backend."""
    from gpuflops.sampler.nvml import NvmlSampler
    from gpuflops.sampler.trace import TraceWriter

    _setup_logging(0)
    stop = threading.Event()
    try:
        sampler = NvmlSampler(interval_s=interval_s, clock_period_s=clock_period_s, stop=stop)
    except SamplerError as e:
        raise click.ClickException(str(e)) from None
    writer = TraceWriter(Path(out), sampler.gpus(), interval_s, _trace_meta(sampler))
    from gpuflops.app.build import handle_signals

    end = time.time() + seconds
    n = 0
    try:
        with handle_signals(stop):
            while time.time() < end and not stop.is_set():
                try:
                    writer.interval(sampler.sample())
                except StopIteration:
                    break
                n += 1
    finally:
        writer.close()
        sampler.close()
    click.echo(f"wrote {n} intervals for {len(sampler.gpus())} unit(s) to {out}")


@main.command()
@click.option("--url", default="http://127.0.0.1:9450/metrics", show_default=True)
@click.option("--once", is_flag=True, help="Print one table and exit.")
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True)
def status(url: str, once: bool, interval_s: float) -> None:
    """Live terminal view of each GPU: activity, clock, TFLOP/s, cumulative FLOPs, processes."""
    from gpuflops.cli.status import fetch_status, render

    while True:
        try:
            text = render(fetch_status(url))
        except OSError as e:
            raise click.ClickException(f"cannot read {url}: {e}") from None
        if once:
            click.echo(text)
            return
        click.clear()
        click.echo(text)
        time.sleep(interval_s)


def _register_commands() -> None:
    """Commands that live beside the code they drive."""
    from gpuflops.cli.decide import decide_command
    from gpuflops.cli.estimate import estimate_command
    from gpuflops.cli.gate import gate_command
    from gpuflops.cli.report import report_command, verify_command
    from gpuflops.client.run import run_command

    for cmd in (run_command, estimate_command, verify_command, report_command, decide_command,
                gate_command):
        main.add_command(cmd)
    try:
        from gpuflops.cli.central import central_group
    except ImportError as e:  # the optional `central` extra (psycopg) is not installed
        missing = str(e)

        @main.command("central")
        def central_unavailable() -> None:
            """The central store needs `pip install gpuflops[central]`."""
            raise click.ClickException(f"the central store needs gpuflops[central]: {missing}")
    else:
        main.add_command(central_group)


_register_commands()

__all__ = ["Settings", "main"]

if __name__ == "__main__":
    main()
