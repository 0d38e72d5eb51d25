"""What ``gpuflops gate`` and ``gpuflops decide`` share: a program's position (its compliance
FLOPs, threshold and verified journal), read from ``--central`` or from this node's ledger and
journal file, and the exit with which both fail when it cannot be known."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from gpuflops.cli.central_options import F, central_options, pins_option
from gpuflops.compliance.gate import EXIT_BAD_INPUT, EXIT_CANNOT_TELL
from gpuflops.compliance.journal import LocalJournal, ProgramJournal, check_journal, load_pins
from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig, Threshold
from gpuflops.ledger.records import LEDGER_FILENAME

JOURNAL_FILENAME = "journal.jsonl"


@dataclass(frozen=True)
class Position:
    """Where a program stands: its compliance FLOPs, threshold and verified journal."""

    program: str
    compliance_flops: float
    threshold: Threshold
    journal: ProgramJournal
    source: str


def exit_with(code: int, message: str) -> NoReturn:
    click.echo(f"gpuflops: {message}", err=True)
    sys.exit(code)


def position(program: str, *, central_url: str | None, central_password_file: Path | None,
             state_dir: Path, config: ProgramsConfig, journal_path: Path | None,
             pins_path: Path | None) -> Position:
    """The program's position from the central store, else from this node's ledger and the
    local journal file. Exits 2 on a bad ``--pins`` file, 3 when the position cannot be known, a
    journal that fails verification included: neither a gate nor a new decision may stand on it."""
    try:
        _nodes, signer_pins = load_pins(pins_path)
    except ProgramConfigError as exc:
        exit_with(EXIT_BAD_INPUT, str(exc))
    if central_url:
        pos = _from_central_store(program, central_url, central_password_file, config,
                                  signer_pins)
    else:
        pos = _from_node_ledger(program, state_dir, config, journal_path, signer_pins)
    if pos.journal.fault is not None:
        exit_with(EXIT_CANNOT_TELL, f"cannot tell: the journal of {program} fails verification "
                                    f"at record {pos.journal.fault.seq}: {pos.journal.fault.reason}")
    return pos


def _from_central_store(program: str, central_url: str, central_password_file: Path | None,
                        config: ProgramsConfig, signer_pins: dict[str, bytes]) -> Position:
    from gpuflops.cli.central import open_store
    from gpuflops.compliance.fleet import load_program
    from gpuflops.ledger.central import CentralError
    from gpuflops.ledger.central_read import CentralReader

    with open_store(central_url, central_password_file, "gpuflops-gate") as store:
        try:
            fp = load_program(CentralReader(store), program, fallback=config,
                              pins=signer_pins or None)
        except (CentralError, ProgramConfigError) as exc:
            exit_with(EXIT_CANNOT_TELL, f"cannot tell: {exc}")
    return Position(program, fp.status.flops_by_basis["compliance"], fp.status.threshold,
                    fp.journal, f"central store {store.config.describe()}")


def _from_node_ledger(program: str, state_dir: Path, config: ProgramsConfig,
                      journal_path: Path | None, signer_pins: dict[str, bytes]) -> Position:
    from gpuflops.compliance.programs import evaluate_ledger
    from gpuflops.compliance.thresholds import resolve_threshold
    from gpuflops.ledger.records import LedgerError
    from gpuflops.ledger.store import Ledger

    path = state_dir / LEDGER_FILENAME
    if not path.exists():
        exit_with(EXIT_CANNOT_TELL, f"cannot tell: no ledger at {path} and no --central")
    try:
        ledger = Ledger.open(path, clock=time.time, readonly=True)
        try:
            statuses, errors = evaluate_ledger(ledger, config)
        finally:
            ledger.close()
        records, keys = LocalJournal(journal_path or state_dir / JOURNAL_FILENAME).records(program)
        if program in errors:
            raise ProgramConfigError(errors[program])
        st = statuses.get(program)
        threshold = st.threshold if st else resolve_threshold(config.for_program(program))
    except (LedgerError, ProgramConfigError) as exc:
        exit_with(EXIT_CANNOT_TELL, f"cannot tell: {exc}")
    journal = check_journal(program, records, {**keys, **signer_pins}, signer_pins or None)
    return Position(program, st.flops_by_basis["compliance"] if st else 0.0, threshold, journal,
                    f"ledger {path}")


def central_or_local_options(fn: F) -> F:
    """Read from ``--central``, or from this node's ledger and journal file."""
    for opt in reversed([
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path("/var/lib/gpuflops"), show_default=True,
                     help="Without --central: the node ledger to read."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Program configuration (TOML or JSON; docs/ledger.md)."),
        click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help=f"Without --central: decisions file [STATE_DIR/{JOURNAL_FILENAME}]."),
        pins_option,
    ]):
        fn = opt(fn)
    return central_options(required=False)(fn)
