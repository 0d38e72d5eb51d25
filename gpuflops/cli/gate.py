"""``gpuflops gate``: may a planned run of a program start? For CI/CD pipelines and launchers.

Exit codes: 0 allowed, 1 refused (the reason is printed), 2 bad input, 3 cannot tell (the
central store or the ledger cannot be read, or the program's journal fails verification).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import click

from gpuflops.cli.central_options import F, central_options, pins_option
from gpuflops.compliance.gate import (
    EXIT_BAD_INPUT,
    EXIT_CANNOT_TELL,
    evaluate_gate,
    parse_estimate,
    planned_from_estimate,
)
from gpuflops.compliance.journal import (
    DEFAULT_GATE_LEVELS,
    LocalJournal,
    ProgramJournal,
    check_journal,
    load_pins,
)
from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig, Threshold, load_programs_config
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
    local journal file. Exits 3 when it cannot be known."""
    try:
        _nodes, signer_pins = load_pins(pins_path)
    except ProgramConfigError as exc:
        exit_with(EXIT_BAD_INPUT, str(exc))
    if central_url:
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


@click.command("gate")
@click.option("--program", required=True)
@click.option("--planned-flops", type=float, default=None, help="FLOPs of the run to start.")
@click.option("--planned-flops-from", type=click.File("r"), default=None,
              help="`gpuflops estimate --json` output ('-': stdin) to take them from.")
@click.option("--method", default=None, help="With --planned-flops-from: which method's figure "
              "(its total less recomputation where the program's policy excludes it).")
@click.option("--level", "levels", type=float, multiple=True,
              help="Gate level, a share of the threshold (repeat) [the program's gate_levels, "
                   "else 0.8 and 1.0].")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@central_or_local_options
def gate_command(program: str, planned_flops: float | None, planned_flops_from: IO[str] | None,
                 method: str | None, levels: tuple[float, ...], as_json: bool,
                 central_url: str | None, central_password_file: Path | None, state_dir: Path,
                 config_path: Path | None, journal_path: Path | None, pins_path: Path | None) -> None:
    """Exit 0 if the planned run may start, 1 (saying why) if it would pass a gate level without a
    recorded decision, 2 on bad input, 3 when the program's position cannot be known."""
    try:
        if (planned_flops is None) == (planned_flops_from is None):
            raise ValueError("give exactly one of --planned-flops and --planned-flops-from")
        if any(lv <= 0 for lv in levels):
            raise ValueError("--level must be a positive share of the threshold")
        config = load_programs_config(config_path)
        if planned_flops_from is not None:
            # What the program's compliance figure will count of the run (its policy).
            planned_flops = planned_from_estimate(
                parse_estimate(planned_flops_from.read()), method,
                exclude_recompute=config.for_program(program).policy.exclude_recompute)
        assert planned_flops is not None
    except (ValueError, ProgramConfigError) as exc:
        exit_with(EXIT_BAD_INPUT, str(exc))
    pos = position(program, central_url=central_url, central_password_file=central_password_file,
                   state_dir=state_dir, config=config, journal_path=journal_path,
                   pins_path=pins_path)
    if pos.journal.fault is not None:
        exit_with(EXIT_CANNOT_TELL, f"cannot tell: the journal of {program} fails verification "
                                    f"at record {pos.journal.fault.seq}: {pos.journal.fault.reason}")
    try:
        result = evaluate_gate(program, pos.compliance_flops, planned_flops, pos.threshold,
                               levels or pos.journal.gate_levels or DEFAULT_GATE_LEVELS,
                               pos.journal.decisions)
    except ValueError as exc:
        exit_with(EXIT_BAD_INPUT, str(exc))
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "source": pos.source}, indent=2, sort_keys=True))
    else:
        click.echo(result.reason, err=not result.allowed)
    sys.exit(result.exit_code)
