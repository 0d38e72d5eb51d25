"""``gpuflops daemon``: settings from defaults, a TOML file and flags; then the daemon runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gpuflops.cli.common import setup_logging
from gpuflops.config import (
    DEFAULT_LISTEN,
    DEFAULT_SOCKET_PATH,
    DEFAULT_STATE_DIR,
    SettingsError,
    load_settings,
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
@click.option("--listen", default=None, help=f"HOST:PORT for /metrics and /healthz [{DEFAULT_LISTEN}].")
@click.option("--interval", "interval_s", type=float, default=None, help="GPM interval in seconds [0.5].")
@click.option("--counters", type=click.Choice(["auto", "cupti", "nvml"]), default=None,
              help="SM and tensor cycle counters: CUPTI PM sampling (cupti), NVML's clock only "
                   "(nvml), or PM sampling where cupti-python is installed (auto) [auto].")
@click.option("--precision", "hmma_precision", default=None,
              help="Assumed tensor-core (HMMA) precision: fp8, bf16, fp16, tf32 [bf16].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--record", "record_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every interval to this trace file.")
@click.option("--socket", "socket_path", default=None, help=f"Job socket path [{DEFAULT_SOCKET_PATH}].")
@click.option("--socket-group", default=None, help="Group (name or gid) that may use the job socket.")
@click.option("--no-socket", is_flag=True, help="Do not open the job socket.")
@click.option("--state-dir", default=None, help=f"Ledger directory [{DEFAULT_STATE_DIR}].")
@click.option("--no-ledger", is_flag=True, help="Run without the persistent ledger (counters restart at 0).")
@click.option("--programs", "program_config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Program thresholds and policy (TOML, docs/ledger.md).")
@click.option("--web-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TLS and basic auth for /metrics (Prometheus exporter-toolkit format).")
@click.option("--kubelet-url", default=None,
              help="Kubelet /pods URL for pod names, e.g. https://$NODE_IP:10250/pods.")
@click.option("--kubelet-ca", "kubelet_ca_file", default=None, help="CA bundle for the kubelet's TLS.")
@click.option("--kubelet-insecure-tls", is_flag=True, help="Do not verify the kubelet's certificate.")
@click.option("-v", "--verbose", count=True)
def daemon_command(
    backend: str | None,
    dcgm_endpoint: str | None,
    dcgm_bindings: tuple[str, ...],
    demo: bool,
    replay_path: str | None,
    speed: float | None,
    no_loop: bool,
    listen: str | None,
    interval_s: float | None,
    counters: str | None,
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
    verbose: int,
) -> None:
    """Run the metering daemon."""
    from gpuflops.app import run
    from gpuflops.app.lifecycle import StartupError
    from gpuflops.sampler.base import SamplerError

    setup_logging(verbose)
    try:
        settings = load_settings(Path(config_path) if config_path else None)
        if demo or replay_path:
            if backend not in (None, "replay"):
                raise SettingsError("--demo/--replay cannot be combined with --backend " + backend)
            backend = "replay"
        settings = settings.with_overrides(
            backend=backend,
            listen=listen,
            interval_s=interval_s,
            counters=counters,
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
        ).validate()
        record = Path(record_path) if record_path else None
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    try:
        run(settings, record=record)
    except SettingsError as e:  # the web-config file
        raise click.ClickException(str(e)) from None
    except SamplerError as e:
        click.echo(f"gpuflops: {e}", err=True)
        sys.exit(2)
    except StartupError as e:
        raise click.ClickException(str(e)) from None
