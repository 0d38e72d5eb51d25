"""``gpuflops daemon``: settings from flags, ``GPUFLOPS_*`` variables, a TOML file and defaults
(in that order); then the daemon runs until SIGTERM/SIGINT, reloading on SIGHUP."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gpuflops.cli.common import log_format_option, log_level_option, setup_logging
from gpuflops.config import (
    DEFAULT_LISTEN,
    DEFAULT_SOCKET_PATH,
    DEFAULT_STATE_DIR,
    DEFAULT_TELEMETRY_PATH,
    KUBELET_POD_RESOURCES_SOCKET,
    Settings,
    SettingsError,
    resolve_settings,
)


@click.command("daemon")
@click.option("--backend", type=click.Choice(["auto", "nvml", "dcgm", "replay"]), default=None)
@click.option("--dcgm-endpoint", default=None, help="DCGM host engine: host:port, unix:///path or embedded.")
@click.option("--dcgm-bindings", multiple=True, help="Directory of DCGM's Python bindings (repeatable).")
@click.option("--demo", is_flag=True, help="Replay the H100 trace shipped with gpuflops (no GPU needed).")
@click.option("--replay", "replay_path", type=click.Path(dir_okay=False), default=None,
              help="Trace to replay (implies --backend replay).")
@click.option("--speed", type=float, default=None,
              help="Replay speed factor (above 1, sample timestamps run ahead of the wall clock).")
@click.option("--no-loop", is_flag=True, help="Stop when the replayed trace ends.")
@click.option("--listen", "--web.listen-address", "listen", default=None,
              help=f"HOST:PORT for /metrics and /healthz [{DEFAULT_LISTEN}].")
@click.option("--web.telemetry-path", "telemetry_path", default=None,
              help=f"Path of the metrics [{DEFAULT_TELEMETRY_PATH}].")
@click.option("--interval", "interval_s", type=float, default=None, help="GPM interval in seconds [0.5].")
@click.option("--counters", type=click.Choice(["auto", "cupti", "nvml"]), default=None,
              help="SM and tensor cycle counters: CUPTI PM sampling (cupti), NVML's clock only "
                   "(nvml), or PM sampling where cupti-python is installed (auto) [auto].")
@click.option("--precision", "hmma_precision", default=None,
              help="Assumed tensor-core (HMMA) precision: fp8, bf16, fp16, tf32 [bf16].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TOML file with a [daemon] table [$GPUFLOPS_CONFIG].")
@click.option("--record", "record_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every interval to this trace file.")
@click.option("--socket", "socket_path", default=None,
              help=f"Job socket path [$GPUFLOPS_SOCKET, {DEFAULT_SOCKET_PATH}].")
@click.option("--socket-group", default=None, help="Group (name or gid) that may use the job socket.")
@click.option("--no-socket", is_flag=True, help="Do not open the job socket.")
@click.option("--state-dir", default=None,
              help=f"Ledger directory [$GPUFLOPS_STATE_DIR, {DEFAULT_STATE_DIR}].")
@click.option("--no-ledger", is_flag=True, help="Run without the persistent ledger (counters restart at 0).")
@click.option("--programs", "program_config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Program thresholds and policy (TOML, docs/ledger.md).")
@click.option("--web-config", "--web.config.file", "web_config",
              type=click.Path(dir_okay=False, exists=True), default=None,
              help="TLS and basic auth for /metrics (Prometheus exporter-toolkit format).")
@click.option("--kubelet-url", default=None,
              help="Kubelet /pods URL for pod names, e.g. https://$NODE_IP:10250/pods.")
@click.option("--kubelet-ca", "kubelet_ca_file", default=None, help="CA bundle for the kubelet's TLS.")
@click.option("--kubelet-insecure-tls", is_flag=True, help="Do not verify the kubelet's certificate.")
@click.option("--pod-resources-socket", default=None, metavar="PATH",
              help="Kubelet PodResources socket: pod names by GPU where /pods is off or fails, "
                   f"e.g. {KUBELET_POD_RESOURCES_SOCKET} (needs gpuflops[kubernetes]).")
@click.option("--central", "central_url", default=None, metavar="URL",
              help="Ship the ledger to this PostgreSQL (libpq URL, no password; docs/fleet.md).")
@click.option("--central-password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the central store's password (else PGPASSWORD / PGPASSFILE).")
@click.option("--node-name", default=None, help="This node's name in the central store [host name].")
@click.option("--cluster", default=None, help="This node's cluster in the central store [default].")
@log_level_option
@log_format_option
@click.option("-v", "--verbose", count=True, help="One log level more detailed per use.")
def daemon_command(config_path: str | None, demo: bool, no_loop: bool, no_socket: bool,
                   no_ledger: bool, kubelet_insecure_tls: bool, record_path: str | None,
                   verbose: int, dcgm_bindings: tuple[str, ...], **flags: Any) -> None:
    """Run the metering daemon.

    Every setting can also be given as GPUFLOPS_<NAME> (e.g. GPUFLOPS_STATE_DIR,
    GPUFLOPS_SERIES_TTL_S) or in the config file's [daemon] table; flags win over variables,
    variables over the file. SIGHUP reloads the configuration and TLS certificates.
    """
    from gpuflops.app import run
    from gpuflops.app.lifecycle import StartupError
    from gpuflops.sampler.base import SamplerError

    backend = flags.pop("backend")
    if (demo or flags["replay_path"]) and backend not in (None, "replay"):
        raise click.ClickException("--demo/--replay cannot be combined with --backend " + backend)
    flags.update(
        backend="replay" if demo or flags["replay_path"] else backend,
        replay_speed=flags.pop("speed"),
        replay_loop=False if no_loop else None,
        job_socket=False if no_socket else None,
        ledger=False if no_ledger else None,
        kubelet_insecure_tls=True if kubelet_insecure_tls else None,
        dcgm_bindings=dcgm_bindings or None,
    )

    def resolve() -> Settings:
        """Run again on SIGHUP: the same flags over the environment and the file as they are now."""
        return resolve_settings(config_path, **flags).validate()

    try:
        settings = resolve()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    setup_logging(verbose, settings.log_level, settings.log_format)
    record = Path(record_path) if record_path else None
    try:
        run(settings, record=record, reload_settings=resolve)
    except SettingsError as e:  # the web-config file
        raise click.ClickException(str(e)) from None
    except SamplerError as e:
        click.echo(f"gpuflops: {e}", err=True)
        sys.exit(2)
    except StartupError as e:
        raise click.ClickException(str(e)) from None
