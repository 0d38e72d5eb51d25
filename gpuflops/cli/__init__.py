"""Command line: one thin module per command over the app and the library.

``gpuflops`` (the console script) and ``python -m gpuflops`` run :func:`main`.
"""

from __future__ import annotations

import click

from gpuflops import __version__


@click.group()
@click.version_option(__version__, prog_name="gpuflops")
def main() -> None:
    """gpuflops: FLOPs executed by GPUs, measured from hardware counters."""


def _register_commands() -> None:
    from gpuflops.cli.daemon import daemon_command
    from gpuflops.cli.estimate import estimate_command
    from gpuflops.cli.record import record_command
    from gpuflops.cli.report import report_command
    from gpuflops.cli.run import run_command
    from gpuflops.cli.status import status_command
    from gpuflops.cli.verify import verify_command

    for cmd in (daemon_command, record_command, status_command, run_command, estimate_command,
                verify_command, report_command):
        main.add_command(cmd)
    # These sign or check signatures (cryptography) or talk to PostgreSQL (psycopg): the
    # optional `central` extra. Without it they say so, and every other command still works.
    try:
        from gpuflops.cli.decide import decide_command
        from gpuflops.cli.gate import gate_command
    except ImportError as e:
        _unavailable("decide", str(e))
        _unavailable("gate", str(e))
    else:
        main.add_command(decide_command)
        main.add_command(gate_command)
    try:
        from gpuflops.cli.central import central_group
    except ImportError as e:
        _unavailable("central", str(e))
    else:
        main.add_command(central_group)


def _unavailable(name: str, missing: str) -> None:
    @main.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"`gpuflops {name}` needs gpuflops[central]: {missing}")

    command.help = f"Needs `pip install gpuflops[central]` ({missing})."


_register_commands()

__all__ = ["main"]
