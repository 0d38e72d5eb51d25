"""``gpuflops central ...``: set up, inspect and serve the central store; the ``--central``
variants of ``verify`` and ``report`` (docs/fleet.md)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from gpuflops.cli.central_options import central_options
from gpuflops.compliance.journal import (
    DEFINITION_KEYS,
    check_journal,
    journal_rows,
    load_pins,
    new_record,
    validate_definition,
)
from gpuflops.compliance.thresholds import (
    RULE_CHOICES,
    ProgramConfigError,
    ProgramsConfig,
    load_programs_config,
)
from gpuflops.ledger.central import CENTRAL_SCHEMA_VERSION, CentralConfig, CentralError, CentralStore
from gpuflops.ledger.central_read import CentralReader
from gpuflops.ledger.signing import KeyFileError, generate_key, load_key, parse_public_key


def open_store(url: str, password_file: Path | None, name: str = "gpuflops-cli") -> CentralStore:
    try:
        return CentralStore(CentralConfig.from_options(url, password_file), application_name=name)
    except CentralError as exc:
        raise click.ClickException(str(exc)) from None


def _fail(exc: Exception, code: int = 2) -> NoReturn:
    click.echo(f"gpuflops: {exc}", err=True)
    sys.exit(code)


@click.group("central")
def central_group() -> None:
    """The fleet tier's central store in PostgreSQL (docs/fleet.md)."""


@central_group.command("init")
@central_options()
def init_command(central_url: str, central_password_file: Path | None) -> None:
    """Create the schema, the roles gpuflops_ship/_read/_decide and their grants."""
    with open_store(central_url, central_password_file) as store:
        try:
            created = store.init_schema()
        except CentralError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"created the central schema (version {CENTRAL_SCHEMA_VERSION})" if created
               else f"the central schema is already at version {CENTRAL_SCHEMA_VERSION}")


@central_group.command("keygen")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Private key file to create (mode 0600; never overwritten).")
def keygen_command(out: Path) -> None:
    """Create an Ed25519 signing key for a person; prints its public key."""
    try:
        key = generate_key(out)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key.public_key_hex)


@central_group.group("signer")
def signer_group() -> None:
    """People who may sign program definitions and decisions."""


@signer_group.command("add")
@central_options()
@click.option("--name", required=True)
@click.option("--public-key", default=None, help="64 hex digits (from `central keygen`).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Or: the signer's private key file, to take its public key from.")
def signer_add(central_url: str, central_password_file: Path | None, name: str,
               public_key: str | None, key_path: Path | None) -> None:
    """Register a signer (needs the schema owner's rights)."""
    try:
        raw = (load_key(key_path).public_key if key_path is not None
               else parse_public_key(public_key or ""))
    except (KeyFileError, ValueError) as exc:
        raise click.ClickException(f"{exc} (give --public-key HEX or --key FILE)") from None
    with open_store(central_url, central_password_file) as store:
        try:
            store.add_signer(name, raw)
        except CentralError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"signer {name}: {raw.hex()}")


@central_group.command("nodes")
@central_options()
@click.option("--pins-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the registered node and signer keys as a pins file to review and keep.")
def nodes_command(central_url: str, central_password_file: Path | None,
                  pins_out: Path | None) -> None:
    """Registered node ledgers: keys, heads, shipping state."""
    with open_store(central_url, central_password_file) as store:
        try:
            ledgers = CentralReader(store).ledgers()
            signers = store.signers()
        except CentralError as exc:
            raise click.ClickException(str(exc)) from None
    for led in ledgers.values():
        state = f"FENCED: {led.failed}" if led.failed else "ok"
        click.echo(f"{led.cluster}\t{led.node}\t{led.ledger_id}\tkey {led.public_key.hex()}\t"
                   f"seq {led.head_seq}\traw {led.raw_seq}\t{state}")
    if pins_out is not None:
        pins = {"nodes": {led.node: led.public_key.hex() for led in ledgers.values()},
                "signers": {n: k.hex() for n, k in sorted(signers.items())}}
        pins_out.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
        click.echo(f"wrote {pins_out}: check each key out of band before relying on it")


@central_group.group("program")
def program_group() -> None:
    """Program definitions, with their history."""


@program_group.command("set")
@central_options()
@click.option("--program", required=True)
@click.option("--by", "signer", required=True, help="Registered signer name.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--note", required=True, help="Why the definition changes.")
@click.option("--from-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take the program's table from this configuration file (docs/ledger.md).")
@click.option("--rule", type=click.Choice(RULE_CHOICES), default=None)
@click.option("--base-model-compute-flops", type=float, default=None)
@click.option("--base-model-compute-source", default=None)
@click.option("--systemic-risk/--no-systemic-risk", default=None)
@click.option("--threshold-flops", type=float, default=None)
@click.option("--gate-level", "gate_levels", type=float, multiple=True,
              help="Share of the threshold at which `gpuflops gate` wants a decision (repeat).")
def program_set(central_url: str, central_password_file: Path | None, program: str, signer: str,
                key_path: Path, note: str, from_config: Path | None, **fields: Any) -> None:
    """Record a new definition of a program (the current one, with the changes given)."""
    try:
        key = load_key(key_path)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    with open_store(central_url, central_password_file) as store:
        try:
            journal = check_journal(program, journal_rows(store.journal(program)).get(program, []),
                                    store.signers())
            if journal.fault is not None:
                raise click.ClickException(f"the journal of {program} fails verification at "
                                           f"record {journal.fault.seq}: {journal.fault.reason}")
            definition = dict(journal.definition or {})
            if from_config is not None:
                table = load_programs_config(from_config).programs.get(program)
                if table is None:
                    raise click.ClickException(f"{from_config} has no [programs.{program}]")
                definition = {k: v for k, v in table.items() if k in DEFINITION_KEYS}
            fields["gate_levels"] = list(fields["gate_levels"]) or None
            definition.update({k: v for k, v in fields.items() if v is not None})
            definition = validate_definition(program, definition)
            _check_signer(store, signer, key.public_key)
            head = journal.records[-1] if journal.records else None
            rec = new_record(program, head, "program", {"definition": definition, "note": note},
                             signer, key, time.time())
            store.append_journal(rec.program, rec.seq, rec.kind, rec.content, rec.prev_hash,
                                 rec.hash, rec.signer, rec.sig)
        except (CentralError, ProgramConfigError) as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"program {program}: definition #{rec.seq} recorded: "
               f"{json.dumps(definition, sort_keys=True)}")


def _check_signer(store: CentralStore, signer: str, public_key: bytes) -> None:
    known = store.signers()
    if signer not in known:
        raise click.ClickException(f"signer {signer!r} is not registered; the schema owner adds "
                                   f"it with `gpuflops central signer add --name {signer} ...`")
    if known[signer] != public_key:
        raise click.ClickException(f"the key given is not {signer!r}'s registered key")


@program_group.command("show")
@central_options()
@click.option("--program", required=True)
def program_show(central_url: str, central_password_file: Path | None, program: str) -> None:
    """The program's definition history and decisions, verified, as JSON."""
    with open_store(central_url, central_password_file) as store:
        try:
            journal = check_journal(program, journal_rows(store.journal(program)).get(program, []),
                                    store.signers())
        except CentralError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({
        "program": program, "definition": journal.definition,
        "records": [{"seq": r.seq, "kind": r.kind, "by": r.signer, "recorded_by": r.recorded_by,
                     **{k: v for k, v in r.obj.items() if k not in ("seq", "kind", "by", "program")}}
                    for r in journal.records],
        "verified": journal.fault is None,
        "fault": None if journal.fault is None else
        {"seq": journal.fault.seq, "reason": journal.fault.reason},
    }, indent=2, sort_keys=True))
    if journal.fault is not None:
        sys.exit(1)


@central_group.command("serve")
@central_options()
@click.option("--listen", default="0.0.0.0:9451", show_default=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Program configuration for programs with no central definition.")
@click.option("--refresh", "refresh_s", type=float, default=30.0, show_default=True,
              help="Seconds between reads of the central store.")
@click.option("--web-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TLS and basic auth for /metrics (exporter-toolkit format).")
def serve_command(central_url: str, central_password_file: Path | None, listen: str,
                  config_path: Path | None, refresh_s: float, web_config: str | None) -> None:
    """Export fleet-wide program totals, threshold ratios and shipping health."""
    from gpuflops.app.central import FleetServer
    from gpuflops.app.lifecycle import handle_signals, http_options
    from gpuflops.cli.common import setup_logging
    from gpuflops.config import SettingsError

    setup_logging(0)
    try:
        fallback = load_programs_config(config_path)
        http_kwargs = http_options(web_config)
        config = CentralConfig.from_options(central_url, central_password_file)
    except (ProgramConfigError, CentralError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        server = FleetServer(config, listen, fallback, refresh_s, **http_kwargs)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc}") from None
    click.echo(f"serving fleet metrics on {listen} (port {server.port})", err=True)
    stop = threading.Event()
    try:
        with handle_signals(stop.set):
            stop.wait()
    finally:
        server.close()


def verify_central(central_url: str, central_password_file: Path | None,
                   pins_path: Path | None) -> None:
    """Body of ``gpuflops verify --central``: exit 0 ok, 1 naming faults, 2 unreadable."""
    from gpuflops.ledger.central_verify import verify_central as run

    try:
        node_pins, signer_pins = load_pins(pins_path)
    except ProgramConfigError as exc:
        _fail(exc)
    with open_store(central_url, central_password_file) as store:
        try:
            reader = CentralReader(store)
            result = run(reader, node_pins=node_pins if pins_path else None)
            signers = store.signers()
            journals = journal_rows(store.journal())
        except CentralError as exc:
            _fail(exc)
    faults = [str(f) for f in result.faults]
    for name, key in sorted(signer_pins.items()):
        if name in signers and signers[name] != key:
            faults.append(f"signer {name}: registered key differs from the pinned key")
    for program, records in sorted(journals.items()):
        checked = check_journal(program, records, signers, signer_pins or None)
        if checked.fault is not None:
            faults.append(f"journal of program {program} record {checked.fault.seq}: "
                          f"{checked.fault.reason}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if faults:
        for f in faults:
            click.echo(f"FAILED: {f}", err=True)
        sys.exit(1)
    click.echo(f"ok: {result.ledgers} node ledgers, {result.records} shipped records and "
               f"{len(journals)} program journals verified")


def central_report(program: str, central_url: str, central_password_file: Path | None,
                   config: ProgramsConfig, accuracy: dict[str, str], pins_path: Path | None
                   ) -> dict[str, Any]:
    """Body of ``gpuflops report --central``: the report document."""
    from gpuflops.compliance.fleet import build_central_report, load_program

    try:
        _nodes, signer_pins = load_pins(pins_path)
    except ProgramConfigError as exc:
        raise click.ClickException(str(exc)) from None
    with open_store(central_url, central_password_file) as store:
        try:
            reader = CentralReader(store)
            fp = load_program(reader, program, fallback=config, pins=signer_pins or None)
            return build_central_report(fp, reader, now_s=time.time(),
                                        source=store.config.describe(), accuracy=accuracy)
        except (CentralError, ProgramConfigError) as exc:
            raise click.ClickException(str(exc)) from None
