"""``gpuflops gate``: may a planned run of a program start? For CI/CD pipelines and launchers.

Exit codes: 0 allowed, 1 refused (the reason is printed), 2 bad input, 3 cannot tell (the
central store or the ledger cannot be read, or the program's journal fails verification).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

import click

from gpuflops.cli.position import central_or_local_options, exit_with, position
from gpuflops.compliance.gate import (
    EXIT_BAD_INPUT,
    evaluate_gate,
    parse_estimate,
    planned_from_estimate,
)
from gpuflops.compliance.journal import DEFAULT_GATE_LEVELS
from gpuflops.compliance.thresholds import ProgramConfigError, load_programs_config


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
