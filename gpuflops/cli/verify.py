"""``gpuflops verify``: check the ledger's hash chain and derived totals."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gpuflops.cli.central_options import central_options, pins_option
from gpuflops.cli.common import config_option, settings_or_exit, state_dir_option
from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import LEDGER_FILENAME


@click.command("verify")
@state_dir_option
@config_option
@central_options(required=False)
@pins_option
def verify_command(state_dir: str | None, config_path: str | None, central_url: str | None,
                   central_password_file: Path | None, pins_path: Path | None) -> None:
    """Check the ledger's hash chain; exit 1 naming the first bad record, 2 if unreadable.

    With --central: every node's shipped chain, signatures and program journal instead."""
    if central_url:
        from gpuflops.cli.central import verify_central

        verify_central(central_url, central_password_file, pins_path)
        return
    state = Path(settings_or_exit(config_path, state_dir=state_dir).state_dir)
    result = verify_path(state / LEDGER_FILENAME)
    if result.ok:
        click.echo(f"ok: {result.records} records, head seq {result.head_seq} "
                   f"hash {result.head_hash}")
        return
    where = f"record {result.first_bad_id}" if result.first_bad_id is not None else "ledger"
    click.echo(f"FAILED at {where}: {result.reason} ({result.records} records verified before "
               f"it; last good hash {result.head_hash or '-'})", err=True)
    sys.exit(1 if result.records else 2)
