"""Job socket wire protocol, version 1: newline-delimited JSON over a Unix SOCK_STREAM socket.

Every request is one JSON object on one line with ``"v"`` and ``"op"``; every request gets exactly
one reply line, ``{"ok": true, ...}`` or ``{"ok": false, "error": CODE, "detail": REASON}``.
docs/protocol.md is the human specification; this module is its executable form, shared by the
daemon (parsing) and the client library (encoding). Validation is strict because job and program
ids become Prometheus labels and the metadata is what an auditor reconstructs an estimate from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_MESSAGE_BYTES = 64 * 1024  # one line, newline included
MAX_BATCH_ITEMS = 1024
MAX_STRING_CHARS = 256
MAX_EXTRA_KEYS = 32
MAX_INT = 2**63 - 1
MAX_FLOAT = 1e40  # ~1e16 times all compute ever spent on one model; anything above is a bug

# Ids become Prometheus label values and file-name-ish ledger keys: keep them boring.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
EXTRA_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")

OPS = ("register", "attach", "add", "claim", "end", "ping", "query")
# Claims a job may make about its own work, which the daemon records and bounds (docs/protocol.md).
# half_rate_tensor_fraction: the share of the job's tensor FLOPs that ran on kernels doing half
# the work per busy tensor cycle (mma.sync m16n8k8 on Hopper), from the client's kernel census.
CLAIM_HALF_RATE = "half_rate_tensor_fraction"
CLAIM_KINDS = (CLAIM_HALF_RATE,)


class ErrorCode:
    """Machine-readable error codes carried in ``"error"`` of a failed reply."""

    BAD_JSON = "bad_json"  # not UTF-8 JSON, or not an object
    TOO_LARGE = "too_large"  # line longer than MAX_MESSAGE_BYTES
    BAD_VERSION = "bad_version"  # "v" missing or not supported
    BAD_OP = "bad_op"  # "op" missing or unknown
    BAD_FIELD = "bad_field"  # a field is missing, unknown, of the wrong type or out of range
    UNKNOWN_JOB = "unknown_job"
    JOB_ENDED = "job_ended"
    CONFLICT = "conflict"  # job exists with another program id
    FORBIDDEN = "forbidden"  # peer uid does not own the job, or pid not in the peer's tree
    NO_SUCH_PROCESS = "no_such_process"
    LIMIT = "limit"  # registry capacity (jobs, pids, connections of a uid) reached
    BOUND = "bound"  # analytic figures beyond what the node's GPUs can physically execute
    UNAVAILABLE = "unavailable"  # the ledger cannot write: nothing applied, retry later
    IDLE = "idle"  # the connection sent nothing for too long and is closed
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request the daemon refuses; becomes an error reply, never a crash."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# Job metadata an auditor needs to reconstruct an analytic estimate (docs/protocol.md lists
# meanings and units). kind: "id", "str", "int0" (>= 0), "int1" (>= 1), "num" (finite >= 0), "bool".
METADATA_FIELDS: Mapping[str, str] = {
    "attempt": "int0",
    "resumed_from": "id",
    "rank": "int0",
    "world_size": "int1",
    "local_rank": "int0",
    "node": "str",
    "model": "str",
    "architecture": "str",
    "params_total": "int0",
    "params_trainable": "int0",
    "precision": "str",
    "method": "str",
    "seq_len": "int1",
    "global_batch_size": "int1",
    "micro_batches": "int1",
    "planned_steps": "int0",
    "data_parallel": "int1",
    "tensor_parallel": "int1",
    "pipeline_parallel": "int1",
    "sharding": "str",
    "activation_checkpointing": "bool",
    "base_model_flops": "num",
    "base_model_flops_source": "str",
    "systemic_risk": "bool",  # the base model is a GPAI model with systemic risk
}
# Fields that differ per rank of one job; everything else in METADATA_FIELDS is per job.
PER_RANK_FIELDS = frozenset({"rank", "local_rank", "node"})
# Registration fields that describe the program (its base model), not the job: only those the
# program policy lets define the program set them, once (docs/protocol.md, "Authorization").
PROGRAM_FACTS = ("base_model_flops", "base_model_flops_source", "systemic_risk")


class Increment(NamedTuple):
    """Analytic work done since the last report: FLOPs, tokens, activation-recompute FLOPs."""

    flops: float
    tokens: float
    recompute_flops: float = 0.0
    adds: int = 1  # client-side add() calls coalesced into this increment


class Register(NamedTuple):
    """Create a job, or join an existing one (another rank); attaches the sender's pid."""

    job: str
    program: str
    metadata: Mapping[str, Any]  # validated METADATA_FIELDS plus "extra"; absent fields omitted
    client: str | None = None


class Attach(NamedTuple):
    """Attribute ``pid`` (and its descendants) to a job; pid must be in the sender's tree."""

    job: str
    pid: int


class Add(NamedTuple):
    """Add analytic increments to a job; ``client``/``seq`` let the daemon drop resends."""

    job: str
    items: tuple[Increment, ...]
    client: str | None = None
    seq: int | None = None


class Claim(NamedTuple):
    """A job's claim about its own work (a kernel census); the latest of each kind counts."""

    job: str
    kind: str
    value: float  # a ratio in [0, 1]
    sampled_steps: int
    evidence: str | None = None


class End(NamedTuple):
    """A participant (rank) is done; ``final`` ends the whole job (``gpuflops run`` sends it)."""

    job: str
    final: bool = False
    rank: int | None = None
    exit_code: int | None = None
    status: str | None = None


class Ping(NamedTuple):
    """Liveness and version check."""

    peer_info: bool = True


class Query(NamedTuple):
    """Read one job's figures."""

    job: str


Request = Register | Attach | Add | Claim | End | Ping | Query


def _bad(name: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, f"{name}: {why}")


@lru_cache(maxsize=4096)
def _is_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a safe id string, else raise ProtocolError."""
    if type(value) is not str:
        raise _bad(name, "must be a string")
    if len(value) > 128 or not _is_id(value):
        raise _bad(name, f"must match {ID_RE.pattern}")
    return value


def check_str(name: str, value: object) -> str:
    """Return ``value`` if it is a printable string of at most MAX_STRING_CHARS characters."""
    if type(value) is not str:
        raise _bad(name, "must be a string")
    if len(value) > MAX_STRING_CHARS:
        raise _bad(name, f"longer than {MAX_STRING_CHARS} characters")
    if not value.isprintable():
        raise _bad(name, "contains control characters")
    return value


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """Return ``value`` if it is a JSON integer (not a bool) in [minimum, 2**63-1]."""
    if type(value) is not int:
        raise _bad(name, "must be an integer")
    if value < minimum or value > MAX_INT:
        raise _bad(name, f"must be in [{minimum}, 2**63-1]")
    return value


def check_num(name: str, value: object) -> float:
    """Return ``value`` as float if it is a finite JSON number >= 0 (bools refused)."""
    if type(value) is int:
        value = float(value) if value <= MAX_INT else math.inf
    elif type(value) is not float:
        raise _bad(name, "must be a number")
    if not (0.0 <= value <= MAX_FLOAT):  # also false for NaN
        raise _bad(name, f"must be finite and in [0, {MAX_FLOAT:g}]")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a JSON boolean."""
    if type(value) is not bool:
        raise _bad(name, "must be true or false")
    return value


_CHECKS = {
    "id": check_id,
    "str": check_str,
    "int0": lambda n, v: check_int(n, v, 0),
    "int1": lambda n, v: check_int(n, v, 1),
    "num": check_num,
    "bool": check_bool,
}


def check_metadata_field(name: str, value: object) -> object:
    """Validate one METADATA_FIELDS entry; ``None`` means unknown and is kept as None."""
    if value is None:
        return None
    kind = METADATA_FIELDS.get(name)
    if kind is None:
        raise _bad(name, "unknown field")
    return _CHECKS[kind](name, value)


def check_extra(value: object) -> dict[str, object]:
    """Validate ``extra``: at most 32 safe keys mapping to strings, numbers, bools or null."""
    if type(value) is not dict:
        raise _bad("extra", "must be an object")
    if len(value) > MAX_EXTRA_KEYS:
        raise _bad("extra", f"more than {MAX_EXTRA_KEYS} keys")
    out: dict[str, object] = {}
    for key, item in value.items():
        if EXTRA_KEY_RE.fullmatch(key) is None:
            raise _bad("extra", f"key {key[:64]!r} must match {EXTRA_KEY_RE.pattern}")
        name = f"extra.{key}"
        if item is None or type(item) is bool:
            out[key] = item
        elif type(item) is str:
            out[key] = check_str(name, item)
        elif type(item) is int:
            out[key] = check_int(name, item, -MAX_INT)
        elif type(item) is float:
            if not math.isfinite(item):
                raise _bad(name, "must be finite")
            out[key] = item
        else:
            raise _bad(name, "must be a string, number, boolean or null")
    return out


def _check_keys(msg: Mapping[str, object], allowed: frozenset[str]) -> None:
    if not allowed.issuperset(msg):
        key = next(k for k in msg if k not in allowed)
        raise _bad(str(key)[:64], "unknown field")


_COMMON = frozenset({"v", "op", "id"})
_REGISTER_KEYS = _COMMON | {"job", "program", "client", "extra"} | set(METADATA_FIELDS)
_ATTACH_KEYS = _COMMON | {"job", "pid"}
_ADD_KEYS = _COMMON | {
    "job", "flops", "tokens", "recompute_flops", "adds", "items", "client", "seq"
}
_ITEM_KEYS = frozenset({"flops", "tokens", "recompute_flops", "adds"})
_CLAIM_KEYS = _COMMON | {"job", "kind", "value", "sampled_steps", "evidence"}
_END_KEYS = _COMMON | {"job", "final", "rank", "exit_code", "status"}
_PING_KEYS = _COMMON
_QUERY_KEYS = _COMMON | {"job"}


def _increment(name: str, msg: Mapping[str, object]) -> Increment:
    if "flops" not in msg or "tokens" not in msg:
        raise _bad(name, "flops and tokens are required")
    flops, tokens = msg["flops"], msg["tokens"]
    recompute = msg.get("recompute_flops", 0.0)
    count = msg.get("adds", 1)
    # Fast path for the common, valid case (the server handles ~10^5 of these per second).
    if (
        type(flops) is float
        and type(tokens) is int
        and type(recompute) is float
        and type(count) is int
        and 0.0 <= flops <= MAX_FLOAT
        and 0.0 <= recompute <= MAX_FLOAT
        and 0 <= tokens <= MAX_INT
        and 1 <= count <= MAX_INT
    ):
        return Increment(flops, float(tokens), recompute, count)
    return Increment(
        check_num(f"{name}flops", flops),
        check_num(f"{name}tokens", tokens),
        check_num(f"{name}recompute_flops", recompute),
        check_int(f"{name}adds", count, 1),
    )


def _parse_add(msg: Mapping[str, Any]) -> Add:
    _check_keys(msg, _ADD_KEYS)
    job = check_id("job", msg.get("job"))
    client = check_id("client", msg["client"]) if "client" in msg else None
    seq = check_int("seq", msg["seq"]) if "seq" in msg else None
    if (client is None) != (seq is None):
        raise _bad("seq", "client and seq go together")
    if "items" in msg:
        if any(k in msg for k in ("flops", "tokens", "recompute_flops", "adds")):
            raise _bad("items", "give either items or flops/tokens, not both")
        raw = msg["items"]
        if type(raw) is not list or not raw or len(raw) > MAX_BATCH_ITEMS:
            raise _bad("items", f"must be a list of 1..{MAX_BATCH_ITEMS} objects")
        items = []
        for i, entry in enumerate(raw):
            if type(entry) is not dict:
                raise _bad(f"items[{i}]", "must be an object")
            _check_keys(entry, _ITEM_KEYS)
            items.append(_increment(f"items[{i}].", entry))
        return Add(job=job, items=tuple(items), client=client, seq=seq)
    return Add(job=job, items=(_increment("", msg),), client=client, seq=seq)


def _parse_register(msg: Mapping[str, Any]) -> Register:
    _check_keys(msg, _REGISTER_KEYS)
    metadata: dict[str, Any] = {}
    for name in METADATA_FIELDS:
        if name in msg:
            value = check_metadata_field(name, msg[name])
            if value is not None:
                metadata[name] = value
    if "extra" in msg and msg["extra"] is not None:
        metadata["extra"] = check_extra(msg["extra"])
    trainable, total = metadata.get("params_trainable"), metadata.get("params_total")
    if trainable is not None and total is not None and trainable > total:
        raise _bad("params_trainable", "exceeds params_total")
    rank, world = metadata.get("rank"), metadata.get("world_size")
    if rank is not None and world is not None and rank >= world:
        raise _bad("rank", "must be < world_size")
    return Register(
        job=check_id("job", msg.get("job")),
        program=check_id("program", msg.get("program")),
        metadata=metadata,
        client=check_id("client", msg["client"]) if msg.get("client") is not None else None,
    )


def _parse_end(msg: Mapping[str, Any]) -> End:
    _check_keys(msg, _END_KEYS)
    exit_code = msg.get("exit_code")
    if exit_code is not None:
        exit_code = check_int("exit_code", exit_code, -MAX_INT)
    return End(
        job=check_id("job", msg.get("job")),
        final=check_bool("final", msg.get("final", False)),
        rank=check_int("rank", msg["rank"]) if msg.get("rank") is not None else None,
        exit_code=exit_code,
        status=check_str("status", msg["status"]) if msg.get("status") is not None else None,
    )


def _parse_claim(msg: Mapping[str, Any]) -> Claim:
    _check_keys(msg, _CLAIM_KEYS)
    kind = msg.get("kind")
    if kind not in CLAIM_KINDS:
        raise _bad("kind", f"must be one of {', '.join(CLAIM_KINDS)}")
    value = check_num("value", msg.get("value"))
    if value > 1.0:
        raise _bad("value", "a fraction must be in [0, 1]")
    evidence = msg.get("evidence")
    return Claim(job=check_id("job", msg.get("job")), kind=kind, value=value,
                 sampled_steps=check_int("sampled_steps", msg.get("sampled_steps"), 1),
                 evidence=None if evidence is None else check_str("evidence", evidence))


def _parse_attach(msg: Mapping[str, Any]) -> Attach:
    _check_keys(msg, _ATTACH_KEYS)
    return Attach(job=check_id("job", msg.get("job")), pid=check_int("pid", msg.get("pid"), 1))


def _parse_ping(msg: Mapping[str, Any]) -> Ping:
    _check_keys(msg, _PING_KEYS)
    return Ping()


def _parse_query(msg: Mapping[str, Any]) -> Query:
    _check_keys(msg, _QUERY_KEYS)
    return Query(job=check_id("job", msg.get("job")))


_PARSERS: dict[str, Callable[[Mapping[str, Any]], Request]] = {
    "add": _parse_add,
    "claim": _parse_claim,
    "register": _parse_register,
    "attach": _parse_attach,
    "end": _parse_end,
    "ping": _parse_ping,
    "query": _parse_query,
}


def message_id(msg: object) -> int | str | None:
    """The request's ``id`` if it is a short string or an integer, else None."""
    if not isinstance(msg, dict) or "id" not in msg:
        return None
    value = msg["id"]
    if (type(value) is int and abs(value) <= MAX_INT) or (type(value) is str and len(value) <= 64):
        return value
    return None


_DECODER = json.JSONDecoder()


def decode(line: bytes) -> dict[str, Any]:
    """Decode one line into a JSON object or raise ProtocolError (never anything else)."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message over {MAX_MESSAGE_BYTES} bytes")
    try:
        text = line.decode()
        try:
            msg, end = _DECODER.raw_decode(text)  # skips decode()'s two whitespace regexes
        except ValueError:
            msg, end = _DECODER.decode(text), len(text)
        if end != len(text) and not text[end:].isspace():
            raise ValueError(f"extra data after the JSON value at character {end}")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid UTF-8 JSON: {exc}"[:200]) from None
    if type(msg) is not dict:
        raise ProtocolError(ErrorCode.BAD_JSON, "message must be a JSON object")
    return msg


def parse(msg: Mapping[str, Any]) -> Request:
    """Validate a decoded message and return the typed request, or raise ProtocolError."""
    version = msg.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {version!r} not supported; use {supported}"
        )
    op = msg.get("op")
    parser = _PARSERS.get(op) if type(op) is str else None
    if parser is None:
        raise ProtocolError(ErrorCode.BAD_OP, f"op must be one of {', '.join(OPS)}")
    return parser(msg)


def encode(msg: Mapping[str, Any]) -> bytes:
    """Encode one message or reply as a compact JSON line."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def error_reply(code: str, detail: str, msg_id: int | str | None = None) -> dict[str, Any]:
    """Build a failed reply."""
    reply: dict[str, Any] = {"ok": False, "error": code, "detail": detail}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply
