"""Thin click commands over the ledger: ``gpuflops verify`` and ``gpuflops report``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import click

from gpuflops.cli.central_options import central_options, pins_option
from gpuflops.compliance.report import (
    PrometheusError,
    PrometheusSource,
    build_report,
    load_accuracy,
    render_html,
)
from gpuflops.compliance.thresholds import ConfigError, load_programs_config
from gpuflops.ledger.store import LEDGER_FILENAME, Ledger, LedgerError, verify_path

DEFAULT_STATE_DIR = Path("/var/lib/gpuflops")

state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR, show_default=True, help="Directory holding ledger.sqlite3.")

DEFAULT_ACCURACY = Path(str(resources.files("gpuflops") / "data" / "accuracy-h100.json"))


@click.command("verify")
@state_dir_option
@central_options(required=False)
@pins_option
def verify_command(state_dir: Path, central_url: str | None, central_password_file: Path | None,
                   pins_path: Path | None) -> None:
    """Check the ledger's hash chain; exit 1 naming the first bad record, 2 if unreadable.

    With --central: every node's shipped chain, signatures and program journal instead."""
    if central_url:
        from gpuflops.cli.central import verify_central

        verify_central(central_url, central_password_file, pins_path)
        return
    result = verify_path(state_dir / LEDGER_FILENAME)
    if result.ok:
        click.echo(f"ok: {result.records} records, head seq {result.head_seq} "
                   f"hash {result.head_hash}")
        return
    where = f"record {result.first_bad_id}" if result.first_bad_id is not None else "ledger"
    click.echo(f"FAILED at {where}: {result.reason} ({result.records} records verified before "
               f"it; last good hash {result.head_hash or '-'})", err=True)
    sys.exit(1 if result.records else 2)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("report")
@click.option("--program", required=True, help="Program to report on.")
@click.option("--format", "fmt", type=click.Choice(["json", "html"]), default="json",
              show_default=True)
@click.option("--prometheus", metavar="URL", default=None,
              help="Take cluster-wide totals from this Prometheus (e.g. http://prom:9090).")
@state_dir_option
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Program configuration (TOML or JSON); see docs/ledger.md.")
@click.option("--accuracy", "accuracy_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON object of accuracy figures [the H100 figures measured in "
              "docs/accuracy.md, shipped as gpuflops/data/accuracy-h100.json].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically) instead of stdout.")
@central_options(required=False)
@pins_option
def report_command(program: str, fmt: str, prometheus: str | None, state_dir: Path,
                   config_path: Path | None, accuracy_path: Path | None,
                   out: Path | None, central_url: str | None, central_password_file: Path | None,
                   pins_path: Path | None) -> None:
    """Write the audit report of one program as JSON or self-contained HTML.

    With --central: across every node and cluster that ever ran it (docs/fleet.md)."""
    try:
        config = load_programs_config(config_path)
        accuracy = load_accuracy(accuracy_path or DEFAULT_ACCURACY)
    except (ConfigError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if central_url:
        from gpuflops.cli.central import central_report
        from gpuflops.compliance.fleet import render_fleet_html

        doc = central_report(program, central_url, central_password_file, config, accuracy,
                             pins_path)
        _emit(doc, fmt, out, lambda d: render_fleet_html(render_html(d), d))
        return
    ledger_path = state_dir / LEDGER_FILENAME
    ledger: Ledger | None = None
    if ledger_path.exists():
        try:
            ledger = Ledger.open(ledger_path, clock=time.time, readonly=True)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc
    elif prometheus is None:
        raise click.ClickException(f"no ledger at {ledger_path} and no --prometheus given")
    try:
        source = PrometheusSource(prometheus) if prometheus else None
        doc = build_report(program, ledger=ledger, config=config, now_s=time.time(),
                           state_dir=state_dir, prometheus=source, accuracy=accuracy)
    except (PrometheusError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if ledger is not None:
            ledger.close()
    _emit(doc, fmt, out, render_html)


def _emit(doc: dict[str, object], fmt: str, out: Path | None,
          html: Callable[[dict[str, object]], str]) -> None:
    text = (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n" if fmt == "json"
            else html(doc))
    if out is None:
        click.echo(text, nl=False)
    else:
        try:
            _write_atomic(out, text)
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc}") from exc
