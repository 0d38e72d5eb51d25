"""``gpuflops decide``: append a signed decision record to a program's journal."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from gpuflops.cli.position import JOURNAL_FILENAME, central_or_local_options, exit_with, position
from gpuflops.compliance.gate import EXIT_BAD_INPUT, EXIT_CANNOT_TELL
from gpuflops.compliance.journal import OUTCOMES, LocalJournal, new_record
from gpuflops.compliance.thresholds import ProgramConfigError, load_programs_config
from gpuflops.ledger.signing import KeyFileError, load_key


@click.command("decide")
@click.option("--program", required=True)
@click.option("--outcome", type=click.Choice(list(OUTCOMES)), required=True,
              help="; ".join(f"{k}: {v}" for k, v in OUTCOMES.items()))
@click.option("--by", "signer", required=True, help="Who decides (a registered signer centrally).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The signer's Ed25519 private key (`gpuflops central keygen`).")
@click.option("--note", required=True, help="The decision's grounds, for the record.")
@click.option("--up-to-ratio", type=float, default=None,
              help="Share of the threshold the decision allows runs to reach (required for "
                   "approved_to_continue).")
@central_or_local_options
def decide_command(program: str, outcome: str, signer: str, key_path: Path, note: str,
                   up_to_ratio: float | None, central_url: str | None,
                   central_password_file: Path | None, state_dir: Path, config_path: Path | None,
                   journal_path: Path | None, pins_path: Path | None) -> None:
    """Record a decision about a program, with the figures it was taken on, signed."""
    if outcome == "approved_to_continue" and up_to_ratio is None:
        exit_with(EXIT_BAD_INPUT, "approved_to_continue needs --up-to-ratio")
    if up_to_ratio is not None and (not math.isfinite(up_to_ratio) or up_to_ratio <= 0
                                    or outcome in ("halt", "becomes_provider")):
        exit_with(EXIT_BAD_INPUT, "--up-to-ratio must be > 0 and applies to "
                                  "stays_downstream_modifier and approved_to_continue only")
    if not note.strip():
        exit_with(EXIT_BAD_INPUT, "--note must say something")
    try:
        key = load_key(key_path)
        config = load_programs_config(config_path)
    except (KeyFileError, ProgramConfigError) as exc:
        exit_with(EXIT_BAD_INPUT, str(exc))
    pos = position(program, central_url=central_url, central_password_file=central_password_file,
                   state_dir=state_dir, config=config, journal_path=journal_path,
                   pins_path=pins_path)
    th = pos.threshold
    body = {"outcome": outcome, "note": note, "up_to_ratio": up_to_ratio, "evidence": {
        "compliance_flops": pos.compliance_flops, "threshold_flops": th.flops, "rule": th.rule,
        "ratio": pos.compliance_flops / th.flops, "source": pos.source,
        "definition_seq": pos.journal.definitions[-1].seq if pos.journal.definitions else None}}
    head = pos.journal.records[-1] if pos.journal.records else None
    rec = new_record(program, head, "decision", body, signer, key, time.time())
    if central_url:
        from gpuflops.cli.central import _check_signer, open_store
        from gpuflops.ledger.central import CentralError

        with open_store(central_url, central_password_file, "gpuflops-decide") as store:
            try:
                _check_signer(store, signer, key.public_key)
                store.append_journal(rec.program, rec.seq, rec.kind, rec.content, rec.prev_hash,
                                     rec.hash, rec.signer, rec.sig)
            except CentralError as exc:
                exit_with(EXIT_CANNOT_TELL, f"not recorded: {exc}")
    else:
        journal = LocalJournal(journal_path or state_dir / JOURNAL_FILENAME)
        try:
            known = journal.records(program)[1].get(signer)
        except ProgramConfigError as exc:
            exit_with(EXIT_CANNOT_TELL, str(exc))
        if known is not None and known != key.public_key:
            exit_with(EXIT_BAD_INPUT, f"{journal.path} knows {signer!r} by another key")
        journal.append(rec, key.public_key)
    click.echo(f"decision #{rec.seq} recorded for {program}: {outcome} by {signer} at "
               f"{pos.compliance_flops / th.flops:.2%} of the {th.rule} threshold")
