"""``gpuflops report``: the audit report of one program, as JSON or self-contained HTML."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click

from gpuflops.cli.central_options import central_options, pins_option
from gpuflops.cli.common import settings_or_exit, state_dir_option
from gpuflops.compliance.accuracy import load_accuracy
from gpuflops.compliance.html import render_html
from gpuflops.compliance.prometheus import PrometheusError, PrometheusSource
from gpuflops.compliance.report import ReportRefusedError, build_report
from gpuflops.compliance.thresholds import ProgramConfigError, load_programs_config
from gpuflops.ledger.records import LEDGER_FILENAME, LedgerError
from gpuflops.ledger.store import Ledger

REPORT_MODE = 0o640  # owner writes, the group (auditors) reads, nobody else: before umask


def _write_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename; the file is REPORT_MODE less the umask (0640 under 022, 0600
    under 077), never world-readable: a report names programs, jobs and models."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, REPORT_MODE & ~umask & ~0o007)
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
              default=None, help="Program configuration (TOML or JSON; see docs/ledger.md) "
              "[the daemon's --programs file].")
@click.option("--daemon-config", type=click.Path(dir_okay=False), default=None,
              help="The daemon's TOML file, to find its state directory [$GPUFLOPS_CONFIG].")
@click.option("--accuracy", "accuracy_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON object of accuracy figures [the figures measured in "
              "docs/accuracy.md for the GPU models the ledger recorded, shipped as "
              "gpuflops/data/accuracy-<model>.json].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically) instead of stdout.")
@click.option("--allow-demo", is_flag=True,
              help="Report on a ledger holding replayed (demo) data; every page says so.")
@central_options(required=False)
@pins_option
def report_command(program: str, fmt: str, prometheus: str | None, state_dir: str | None,
                   config_path: Path | None, daemon_config: str | None,
                   accuracy_path: Path | None, out: Path | None, allow_demo: bool,
                   central_url: str | None, central_password_file: Path | None,
                   pins_path: Path | None) -> None:
    """Write the audit report of one program as JSON or self-contained HTML.

    Refuses, exit 1 and nothing written, for a program no job reported, a ledger that fails
    verification, or replayed (demo) data without --allow-demo.
    With --central: across every node and cluster that ever ran it (docs/fleet.md)."""
    settings = settings_or_exit(daemon_config, state_dir=state_dir)
    state = Path(settings.state_dir)
    if config_path is None and settings.program_config:
        config_path = Path(settings.program_config)
    try:
        config = load_programs_config(config_path)
        # Without --accuracy: the figures of the GPU models the ledger's sessions recorded.
        accuracy = load_accuracy(accuracy_path) if accuracy_path else None
    except (ProgramConfigError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if central_url:
        from gpuflops.cli.central import central_report
        from gpuflops.compliance.fleet import render_fleet_html

        doc = central_report(program, central_url, central_password_file, config, accuracy or {},
                             pins_path)
        _emit(doc, fmt, out, lambda d: render_fleet_html(render_html(d), d))
        return
    ledger_path = state / LEDGER_FILENAME
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
                           state_dir=state, prometheus=source, accuracy=accuracy,
                           allow_demo=allow_demo)
    except ReportRefusedError as exc:
        raise click.ClickException(f"no report: {exc}") from exc
    except (PrometheusError, ProgramConfigError) as exc:
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
