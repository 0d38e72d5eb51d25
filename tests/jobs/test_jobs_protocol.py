"""Protocol parsing: strict types, bounded strings, safe ids, versions."""

from __future__ import annotations

import json
import math

import pytest

from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ErrorCode, ProtocolError


def parse_line(msg: object) -> protocol.Request:
    return protocol.parse(protocol.decode(json.dumps(msg).encode()))


def error_of(raw: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        protocol.parse(protocol.decode(raw))
    return info.value.code


def test_register_full_metadata() -> None:
    req = parse_line(
        {
            "v": 1, "op": "register", "job": "ft-42", "program": "acme.llm", "attempt": 2,
            "resumed_from": "ft-41", "rank": 3, "world_size": 8, "local_rank": 3, "node": "n1",
            "model": "llama-3-8b", "architecture": "LlamaForCausalLM",
            "params_total": 8_000_000_000,
            "params_trainable": 40_000_000, "precision": "bf16", "method": "lora", "seq_len": 4096,
            "global_batch_size": 256, "micro_batches": 8, "planned_steps": 1000,
            "data_parallel": 8, "tensor_parallel": 1, "pipeline_parallel": 1, "sharding": "zero3",
            "activation_checkpointing": True, "base_model_flops": 1.2e24,
            "base_model_flops_source": "model card", "extra": {"dataset": "x", "lr": 1e-4},
        }
    )
    assert isinstance(req, protocol.Register)
    assert req.job == "ft-42" and req.program == "acme.llm"
    assert req.metadata["params_trainable"] == 40_000_000
    assert req.metadata["activation_checkpointing"] is True
    assert req.metadata["extra"] == {"dataset": "x", "lr": 1e-4}


def test_add_single_and_batch() -> None:
    single = parse_line({"v": 1, "op": "add", "job": "j", "flops": 1e12, "tokens": 5})
    assert isinstance(single, protocol.Add)
    assert single.items == (protocol.Increment(1e12, 5.0, 0.0, 1),)
    batch = parse_line(
        {"v": 1, "op": "add", "job": "j", "client": "c1", "seq": 7,
         "items": [{"flops": 1, "tokens": 2, "recompute_flops": 3, "adds": 4},
                   {"flops": 5.5, "tokens": 6}]}
    )
    assert isinstance(batch, protocol.Add)
    assert batch.seq == 7 and batch.client == "c1"
    assert batch.items == (protocol.Increment(1.0, 2.0, 3.0, 4), protocol.Increment(5.5, 6.0))


@pytest.mark.parametrize(
    "msg",
    [
        {"v": 1, "op": "add", "job": "j", "flops": -1, "tokens": 0},
        {"v": 1, "op": "add", "job": "j", "flops": True, "tokens": 0},
        {"v": 1, "op": "add", "job": "j", "flops": "1e9", "tokens": 0},
        {"v": 1, "op": "add", "job": "j", "flops": 1e300, "tokens": 0},
        {"v": 1, "op": "add", "job": "j", "flops": 1.0},
        {"v": 1, "op": "add", "job": "j", "flops": 1.0, "tokens": 1, "pid": 5},
        {"v": 1, "op": "add", "job": "j", "items": []},
        {"v": 1, "op": "add", "job": "j", "items": [{"flops": 1, "tokens": 1, "x": 1}]},
        {"v": 1, "op": "add", "job": "j", "flops": 1, "tokens": 1, "seq": 1},
        {"v": 1, "op": "add", "job": "bad job", "flops": 1, "tokens": 1},
        {"v": 1, "op": "add", "job": "a" * 129, "flops": 1, "tokens": 1},
        {"v": 1, "op": "add", "job": 'x"}', "flops": 1, "tokens": 1},
        {"v": 1, "op": "register", "job": "j", "program": "p", "rank": 1.0},
        {"v": 1, "op": "register", "job": "j", "program": "p", "world_size": 0},
        {"v": 1, "op": "register", "job": "j", "program": "p", "rank": 4, "world_size": 4},
        {"v": 1, "op": "register", "job": "j", "program": "p", "params_total": 1,
         "params_trainable": 2},
        {"v": 1, "op": "register", "job": "j", "program": "p", "model": "x" * 257},
        {"v": 1, "op": "register", "job": "j", "program": "p", "model": "a\nb"},
        {"v": 1, "op": "register", "job": "j", "program": "p", "activation_checkpointing": 1},
        {"v": 1, "op": "register", "job": "j", "program": "p", "extra": {"bad key": 1}},
        {"v": 1, "op": "register", "job": "j", "program": "p", "extra": {"k": [1]}},
        {"v": 1, "op": "register", "job": "j"},
        {"v": 1, "op": "attach", "job": "j", "pid": 0},
        {"v": 1, "op": "end", "job": "j", "final": "yes"},
    ],
)
def test_bad_fields_rejected(msg: dict[str, object]) -> None:
    assert error_of(json.dumps(msg).encode()) == ErrorCode.BAD_FIELD


def test_nan_and_infinity_rejected() -> None:
    assert error_of(b'{"v":1,"op":"add","job":"j","flops":NaN,"tokens":1}') == ErrorCode.BAD_FIELD
    assert error_of(b'{"v":1,"op":"add","job":"j","flops":1e999,"tokens":1}') == ErrorCode.BAD_FIELD
    assert not math.isnan(protocol.check_num("x", 0.0))


def test_version_error_names_supported_versions() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_line({"v": 2, "op": "ping"})
    assert info.value.code == ErrorCode.BAD_VERSION
    assert "1" in info.value.detail
    assert error_of(b'{"op":"ping"}') == ErrorCode.BAD_VERSION
    assert error_of(b'{"v":true,"op":"ping"}') == ErrorCode.BAD_VERSION


def test_bad_json_and_ops() -> None:
    assert error_of(b"{not json") == ErrorCode.BAD_JSON
    assert error_of(b"[1,2]") == ErrorCode.BAD_JSON
    assert error_of(b"\xff\xfe") == ErrorCode.BAD_JSON
    assert error_of(b"[" * 100_000) in (ErrorCode.BAD_JSON, ErrorCode.TOO_LARGE)
    assert error_of(b'{"v":1} {"v":1}') == ErrorCode.BAD_JSON
    assert error_of(b'{"v":1,"op":"launch"}') == ErrorCode.BAD_OP
    assert error_of(b"x" * (protocol.MAX_MESSAGE_BYTES + 1)) == ErrorCode.TOO_LARGE


def test_deep_nesting_within_size_limit_is_bad_json() -> None:
    assert error_of(b"[" * 60_000 + b"]" * 2) == ErrorCode.BAD_JSON


def test_claim_parses_and_bounds_its_value() -> None:
    ok = protocol.parse({"v": 1, "op": "claim", "job": "j", "kind": "half_rate_tensor_fraction",
                         "value": 0.25, "sampled_steps": 1, "evidence": "torch.profiler"})
    assert ok == protocol.Claim("j", "half_rate_tensor_fraction", 0.25, 1, "torch.profiler")
    for bad in ({"value": 1.5}, {"value": -0.1}, {"kind": "discount"}, {"sampled_steps": 0},
                {"value": float("nan")}, {"extra": 1}):
        msg = {"v": 1, "op": "claim", "job": "j", "kind": "half_rate_tensor_fraction",
               "value": 0.25, "sampled_steps": 1, **bad}
        with pytest.raises(ProtocolError) as e:
            protocol.parse(msg)
        assert e.value.code == ErrorCode.BAD_FIELD
