"""``gpuflops run``: run a command as a registered job (the launcher is gpuflops/client/run.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from gpuflops.cli.common import config_option, settings_or_exit
from gpuflops.client.run import run_job
from gpuflops.config import DEFAULT_SOCKET_PATH
from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ProtocolError


def _parse_meta(values: Sequence[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        try:
            if key in protocol.METADATA_FIELDS:
                if protocol.METADATA_FIELDS[key] in ("str", "id") and not isinstance(value, str):
                    value = raw
                meta[key] = protocol.check_metadata_field(key, value)
            else:
                extra[key] = value
        except ProtocolError as exc:
            raise click.BadParameter(exc.detail, param_hint="--meta") from None
    if extra:
        try:
            meta["extra"] = protocol.check_extra(extra)
        except ProtocolError as exc:
            raise click.BadParameter(exc.detail, param_hint="--meta") from None
    return meta


def _check_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return protocol.check_id(param.name or "id", value)
    except ProtocolError as exc:
        raise click.BadParameter(exc.detail) from None


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--job", required=True, callback=_check_id, help="Job id (a Prometheus label).")
@click.option("--program", required=True, callback=_check_id, help="Program (compliance) id.")
@click.option(
    "--socket",
    "socket_path",
    default=None,
    help=f"Daemon socket [$GPUFLOPS_SOCKET, the config file's socket_path, {DEFAULT_SOCKET_PATH}].",
)
@config_option
@click.option(
    "--meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Job metadata (model=..., params_total=..., method=lora, ...); repeatable.",
)
@click.option("--require-daemon", is_flag=True, help="Fail instead of running unregistered.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(
    job: str,
    program: str,
    socket_path: str | None,
    config_path: str | None,
    meta: tuple[str, ...],
    require_daemon: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND as job JOB of PROGRAM: its whole process tree is metered for the job.

    The socket is found as the daemon finds it: --socket, $GPUFLOPS_SOCKET, the config file
    (--config or $GPUFLOPS_CONFIG), the default.
    """
    socket_path = settings_or_exit(config_path, socket_path=socket_path).socket_path
    code = run_job(
        job,
        program,
        command,
        socket_path=socket_path,
        metadata=_parse_meta(meta),
        require_daemon=require_daemon,
    )
    sys.exit(code)

