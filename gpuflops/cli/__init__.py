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
    from gpuflops.cli.decide import decide_command
    from gpuflops.cli.estimate import estimate_command
    from gpuflops.cli.gate import gate_command
    from gpuflops.cli.record import record_command
    from gpuflops.cli.report import report_command
    from gpuflops.cli.run import run_command
    from gpuflops.cli.status import status_command
    from gpuflops.cli.verify import verify_command

    for cmd in (daemon_command, record_command, status_command, run_command, estimate_command,
                verify_command, report_command, decide_command, gate_command):
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

__all__ = ["main"]
