"""Program definitions and decisions: one signed, hash-chained journal per program.

A ``program`` record holds the whole definition in force from then on (rule, base model
compute and its source, systemic risk, levels, policy, gate levels); a ``decision`` record
holds the legal decision taken about the program. Each names its signer (``by``), is chained
(``hash = sha256(prev_hash || content)``, as in the ledger) and is signed with the signer's
Ed25519 key. The journal is kept in the central store (``gpuflops.journal``) or, without one,
in a local JSONL file whose records carry the signer's public key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflops.compliance.thresholds import ProgramConfigError, ProgramsConfig
from gpuflops.ledger.signing import SigningKey, parse_public_key, verify_signature
from gpuflops.ledger.store import GENESIS_PREV_HASH, canonical_json, record_hash

JOURNAL_SIGNING_CONTEXT = b"gpuflops journal v1\n"
OUTCOMES: Mapping[str, str] = {
    "stays_downstream_modifier": "the program stays below the threshold: runs may continue up "
                                 "to the threshold (or --up-to-ratio, if lower)",
    "approved_to_continue": "runs may continue up to --up-to-ratio of the threshold",
    "becomes_provider": "the modifier accepts the provider obligations: no compute limit",
    "halt": "no further run of the program may start",
}
DEFAULT_GATE_LEVELS = (0.8, 1.0)
DEFINITION_KEYS = frozenset({
    "rule", "base_model_compute_flops", "base_model_compute_source", "systemic_risk",
    "threshold_flops", "levels", "tolerance", "assumed_precision", "policy", "gate_levels"})


def journal_signing_message(hash_hex: str) -> bytes:
    return JOURNAL_SIGNING_CONTEXT + hash_hex.encode("ascii")


@dataclass(frozen=True)
class JournalRecord:
    """One journal record as stored."""

    program: str
    seq: int
    kind: str
    content: str
    prev_hash: str
    hash: str
    signer: str
    sig: bytes
    recorded_by: str | None = None

    @property
    def obj(self) -> dict[str, Any]:
        return dict(json.loads(self.content))


def new_record(program: str, head: JournalRecord | None, kind: str, body: Mapping[str, Any],
               signer: str, key: SigningKey, t_s: float) -> JournalRecord:
    """The next record of ``program``'s journal after ``head``, signed with ``key``."""
    if kind not in ("program", "decision"):
        raise ValueError(f"unknown journal record kind {kind!r}")
    seq = 1 if head is None else head.seq + 1
    prev = GENESIS_PREV_HASH if head is None else head.hash
    content = canonical_json({**body, "kind": kind, "program": program, "seq": seq, "by": signer,
                              "t_s": t_s})
    h = record_hash(prev, content)
    return JournalRecord(program, seq, kind, content, prev, h, signer,
                         key.sign(journal_signing_message(h)))


def validate_definition(program: str, definition: Mapping[str, Any]) -> dict[str, Any]:
    """A program definition checked the way a configuration file is (unknown keys are errors)."""
    unknown = set(definition) - DEFINITION_KEYS
    if unknown:
        raise ProgramConfigError(f"program {program!r}: unknown keys {sorted(unknown)}")
    out = {k: v for k, v in definition.items() if v is not None}
    gate = out.get("gate_levels")
    if gate is not None and (not isinstance(gate, list | tuple) or not gate or any(
            not isinstance(x, int | float) or not float(x) > 0 for x in gate)):
        raise ProgramConfigError(f"program {program!r}: gate_levels must be positive ratios of the "
                          "threshold, e.g. [0.8, 1.0]")
    to_programs_config(program, out).for_program(program)  # raises ProgramConfigError when invalid
    return out


def to_programs_config(program: str, definition: Mapping[str, Any],
                       fallback: ProgramsConfig | None = None) -> ProgramsConfig:
    """A ProgramsConfig in which ``program`` has ``definition`` (gate levels left out)."""
    base = fallback or ProgramsConfig()
    entry = {k: v for k, v in definition.items() if k != "gate_levels"}
    return ProgramsConfig(defaults=base.defaults, programs={**base.programs, program: entry})


@dataclass(frozen=True)
class Decision:
    """A verified decision record."""

    seq: int
    outcome: str
    by: str
    t_s: float
    note: str
    up_to_ratio: float | None
    evidence: Mapping[str, Any]

    @property
    def covers_ratio(self) -> float:
        """Up to which share of the threshold runs are allowed after this decision."""
        if self.outcome == "becomes_provider":
            return math.inf
        if self.outcome == "halt":
            return -math.inf
        if self.outcome == "stays_downstream_modifier":
            return min(1.0, self.up_to_ratio) if self.up_to_ratio is not None else 1.0
        return self.up_to_ratio if self.up_to_ratio is not None else -math.inf


@dataclass(frozen=True)
class ProgramJournal:
    """A program's journal after verification: definition history and decisions."""

    program: str
    records: tuple[JournalRecord, ...]
    fault: JournalFault | None

    @property
    def definitions(self) -> list[JournalRecord]:
        return [r for r in self.records if r.kind == "program"]

    @property
    def definition(self) -> dict[str, Any] | None:
        defs = self.definitions
        return None if not defs else dict(defs[-1].obj["definition"])

    @property
    def decisions(self) -> list[Decision]:
        out = []
        for r in self.records:
            if r.kind == "decision":
                o = r.obj
                out.append(Decision(r.seq, o["outcome"], o["by"], float(o["t_s"]), o.get("note", ""),
                                    None if o.get("up_to_ratio") is None else float(o["up_to_ratio"]),
                                    o.get("evidence", {})))
        return out

    @property
    def gate_levels(self) -> tuple[float, ...] | None:
        d = self.definition
        return None if d is None or "gate_levels" not in d else tuple(sorted(map(float, d["gate_levels"])))


@dataclass(frozen=True)
class JournalFault:
    """The first bad record of a program's journal."""

    program: str
    seq: int
    reason: str


def check_journal(program: str, records: Sequence[JournalRecord], signers: Mapping[str, bytes],
                  pins: Mapping[str, bytes] | None = None) -> ProgramJournal:
    """Verify chain, content and signatures; records after the first fault are dropped."""
    prev, expected = GENESIS_PREV_HASH, 1
    good: list[JournalRecord] = []

    def fault(seq: int, reason: str) -> ProgramJournal:
        return ProgramJournal(program, tuple(good), JournalFault(program, seq, reason))

    for r in sorted(records, key=lambda x: x.seq):
        if r.seq != expected:
            return fault(expected, f"record {expected} is missing (next is {r.seq})")
        if r.prev_hash != prev:
            return fault(r.seq, "prev_hash does not match the previous record's hash")
        if record_hash(prev, r.content) != r.hash:
            return fault(r.seq, "hash does not match the content (record edited)")
        try:
            obj = json.loads(r.content)
        except ValueError:
            return fault(r.seq, "content is not JSON")
        if canonical_json(obj) != r.content or (obj.get("seq"), obj.get("program"), obj.get("kind"),
                                                 obj.get("by")) != (r.seq, program, r.kind, r.signer):
            return fault(r.seq, "content does not match its seq, program, kind or signer")
        key = signers.get(r.signer)
        if key is None:
            return fault(r.seq, f"signer {r.signer!r} is not registered")
        if pins is not None and r.signer in pins and pins[r.signer] != key:
            return fault(r.seq, f"signer {r.signer!r} is registered with a key that differs "
                                "from the pinned one")
        if not verify_signature(key, journal_signing_message(r.hash), r.sig):
            return fault(r.seq, f"signature does not verify with {r.signer!r}'s key (forged or "
                                "altered record)")
        if r.kind == "decision" and obj.get("outcome") not in OUTCOMES:
            return fault(r.seq, f"unknown outcome {obj.get('outcome')!r}")
        good.append(r)
        prev, expected = r.hash, r.seq + 1
    return ProgramJournal(program, tuple(good), None)


class LocalJournal:
    """The journal in a JSONL file, for a node without a central store (append + fsync).

    Each line also carries the signer's public key: the first record of a signer name fixes
    its key for the file, and pinned keys (``pins``) are checked against it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(dict(json.loads(line)))
                except ValueError as exc:
                    raise ProgramConfigError(f"{self.path}:{n}: not JSON: {exc}") from None
        return out

    def records(self, program: str) -> tuple[list[JournalRecord], dict[str, bytes]]:
        """(records of ``program``, signer keys as first seen in the file)."""
        recs: list[JournalRecord] = []
        keys: dict[str, bytes] = {}
        for d in self._lines():
            try:
                keys.setdefault(d["signer"], parse_public_key(d["public_key"]))
                if d["program"] == program:
                    recs.append(JournalRecord(d["program"], int(d["seq"]), d["kind"], d["content"],
                                              d["prev_hash"], d["hash"], d["signer"],
                                              bytes.fromhex(d["sig"])))
            except (KeyError, ValueError, TypeError) as exc:
                raise ProgramConfigError(f"{self.path}: malformed journal line: {exc}") from None
        return recs, keys

    def append(self, record: JournalRecord, public_key: bytes) -> None:
        line = json.dumps({"program": record.program, "seq": record.seq, "kind": record.kind,
                           "content": record.content, "prev_hash": record.prev_hash,
                           "hash": record.hash, "signer": record.signer,
                           "public_key": public_key.hex(), "sig": record.sig.hex()},
                          sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def load_pins(path: Path | None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Pinned keys from a JSON file ``{"nodes": {name: hex}, "signers": {name: hex}}``."""
    if path is None:
        return {}, {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or set(data) - {"nodes", "signers"}:
            raise ValueError('expected {"nodes": {...}, "signers": {...}}')
        return ({str(k): parse_public_key(v) for k, v in data.get("nodes", {}).items()},
                {str(k): parse_public_key(v) for k, v in data.get("signers", {}).items()})
    except (OSError, ValueError, AttributeError) as exc:
        raise ProgramConfigError(f"pins file {path}: {exc}") from None


def journal_rows(rows: Iterable[Sequence[Any]]) -> dict[str, list[JournalRecord]]:
    """Central ``journal`` rows grouped by program."""
    out: dict[str, list[JournalRecord]] = {}
    for p, seq, kind, content, prev, h, signer, sig, by in rows:
        out.setdefault(p, []).append(JournalRecord(p, int(seq), kind, content, prev, h, signer,
                                                   bytes(sig), by))
    return out
