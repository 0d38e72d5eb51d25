"""10,000 fuzzed messages over a real socket: one reply each, no crash, other jobs untouched."""

from __future__ import annotations

import json
import random
from typing import Any

from gpuflops.jobs.protocol import MAX_MESSAGE_BYTES
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer
from tests.jobs.jobsock_client import Client

VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**64, 1e308, -0.0, 1.5, "", "x", "bad id", "a" * 300,
    [], [1], {}, {"flops": 1}, "NaN", "\u0000", "victim2",
]
FIELDS = ["v", "op", "job", "program", "flops", "tokens", "recompute_flops", "items", "pid",
          "rank", "world_size", "seq", "client", "final", "extra", "params_total", "id"]
OPS = ["register", "attach", "add", "end", "ping", "query", "launch", "", None]


def _base(rng: random.Random) -> dict[str, Any]:
    op = rng.choice(["add", "register", "attach", "end", "query", "ping"])
    return {
        "v": 1,
        "op": op,
        "job": "ghost" if op == "end" else rng.choice(["fuzz", "ghost"]),
        "program": "p",
        "flops": rng.choice([1.0, 2.5e12]),
        "tokens": rng.choice([1, 7]),
    }


def fuzz_message(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    elif kind < 0.30:
        text = json.dumps(_base(rng)).encode()
        raw = text[: rng.randrange(1, len(text))]
    elif kind < 0.55:
        msg = _base(rng)
        for _ in range(rng.randrange(1, 4)):
            msg[rng.choice(FIELDS)] = rng.choice(VALUES)
        raw = json.dumps(msg).encode()
    elif kind < 0.62:
        msg = _base(rng)
        msg["v"] = rng.choice([0, 2, 99, "1", 1.0, None, [1]])
        raw = json.dumps(msg).encode()
    elif kind < 0.67:
        msg = _base(rng)
        msg["op"] = rng.choice(OPS)
        raw = json.dumps(msg).encode()
    elif kind < 0.70:
        depth = rng.randrange(100, 30_000)
        raw = b"[" * depth + b"]" * rng.randrange(0, depth)
    elif kind < 0.71:
        pad = b"y" * rng.randrange(MAX_MESSAGE_BYTES, 3 * MAX_MESSAGE_BYTES)
        raw = b'{"v":1,"op":"ping","pad":"' + pad + b'"}'
    elif kind < 0.75:
        items = [
            {"flops": rng.choice([*VALUES, 1.0]), "tokens": 1} for _ in range(rng.randrange(1, 5))
        ]
        raw = json.dumps({"v": 1, "op": "add", "job": "fuzz", "items": items}).encode()
    else:
        raw = json.dumps(
            {"v": 1, "op": "add", "job": "fuzz", "flops": rng.choice([1.0, 3.0]), "tokens": 1}
        ).encode()
    raw = raw.replace(b"\n", b" ")
    if not raw.strip():
        raw = b"#" + raw
    return raw + b"\n"


def _applied_flops(line: bytes) -> float:
    """FLOPs an ``ok`` reply to our own message means were added to job "fuzz"."""
    msg = json.loads(line)
    if msg.get("op") != "add":
        return 0.0
    assert msg.get("job") == "fuzz"
    if "items" in msg:
        return float(sum(i["flops"] for i in msg["items"]))
    return float(msg["flops"])


def test_fuzz_10000_messages(server: JobSocketServer, registry: JobRegistry) -> None:
    rng = random.Random(20240611)
    path = str(server.path)
    with Client(path) as victim, Client(path) as fuzzer:
        assert victim.call(op="register", job="victim", program="p", model="m")["ok"]
        first = victim.call(op="add", job="victim", flops=123.0, tokens=4, recompute_flops=5.0)
        assert first["ok"]
        assert fuzzer.call(op="register", job="fuzz", program="p")["ok"]
        expected_fuzz = 0.0
        errors: dict[str, int] = {}
        sent = 0
        while sent < 10_000:
            batch = [fuzz_message(rng) for _ in range(min(100, 10_000 - sent))]
            fuzzer.send_raw(b"".join(batch))
            for line in batch:
                reply = fuzzer.reply()
                if reply["ok"]:
                    expected_fuzz += _applied_flops(line)
                else:
                    assert isinstance(reply["detail"], str) and reply["detail"]
                    errors[reply["error"]] = errors.get(reply["error"], 0) + 1
            sent += len(batch)
            assert victim.call(op="ping")["ok"]  # other connections are unaffected throughout
        assert {"bad_json", "bad_field", "bad_version", "bad_op", "too_large"} <= set(errors)
        query = victim.call(op="query", job="victim")["job"]
        assert (query["analytic_flops"], query["analytic_tokens"]) == (123.0, 4.0)
        assert query["recompute_flops"] == 5.0 and query["state"] == "open"
        assert query["metadata"] == {"model": "m"}
        fuzz_job = registry.snapshot().job("fuzz")
        assert fuzz_job is not None and fuzz_job.analytic_flops == expected_fuzz > 0
        assert server.stats().loop_errors == 0
