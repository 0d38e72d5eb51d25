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
@click.option("--against-prometheus", "prometheus_url", metavar="URL", default=None,
              help="Also compare the chain with the heads this Prometheus recorded from the "
                   "daemon (gpuflops_ledger_head_*): proves a rewrite the file alone cannot.")
@central_options(required=False)
@pins_option
def verify_command(state_dir: str | None, config_path: str | None, prometheus_url: str | None,
                   central_url: str | None, central_password_file: Path | None,
                   pins_path: Path | None) -> None:
    """Check the ledger's hash chain; exit 1 naming the first bad record, 2 if unreadable.

    With --against-prometheus: then every chain head Prometheus recorded must be in the chain
    (exit 1 naming the first that is not; 2 when Prometheus holds none or cannot be read).
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
        if prometheus_url:
            _against_prometheus(state / LEDGER_FILENAME, prometheus_url)
        return
    where = f"record {result.first_bad_id}" if result.first_bad_id is not None else "ledger"
    click.echo(f"FAILED at {where}: {result.reason} ({result.records} records verified before "
               f"it; last good hash {result.head_hash or '-'})", err=True)
    sys.exit(1 if result.records else 2)


def _against_prometheus(path: Path, url: str) -> None:
    import time

    from gpuflops.compliance.anchors import check_against_prometheus
    from gpuflops.compliance.prometheus import PrometheusError, PrometheusSource
    from gpuflops.ledger.records import LedgerError
    from gpuflops.ledger.store import Ledger

    try:
        ledger = Ledger.open(path, clock=time.time, readonly=True)
    except LedgerError as e:
        click.echo(f"FAILED: {e}", err=True)
        sys.exit(2)
    try:
        check = check_against_prometheus(ledger, PrometheusSource(url))
    except PrometheusError as e:
        click.echo(f"cannot compare with Prometheus: {e}", err=True)
        sys.exit(2)
    finally:
        ledger.close()
    if check.ok:
        click.echo(f"ok: the {check.heads} chain heads {url} recorded for ledger "
                   f"{check.ledger_id} are all in the chain")
        return
    click.echo(f"FAILED against {url}: {check.reason}", err=True)
    sys.exit(1 if check.heads else 2)
