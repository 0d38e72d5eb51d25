"""The gate's rule: levels, decisions and what each outcome covers (pure, no store)."""

from __future__ import annotations

import math

import pytest

from gpuflops.compliance.gate import evaluate_gate, parse_estimate, planned_from_estimate
from gpuflops.compliance.journal import Decision
from gpuflops.compliance.thresholds import Threshold

TH = Threshold("one_third_of_base", 1e22, "one third", 3e22, "model card", False)


def _d(outcome: str, up_to: float | None = None, seq: int = 1) -> Decision:
    return Decision(seq, outcome, "alice", 1.7e9, "reviewed", up_to, {})


@pytest.mark.parametrize(("done", "planned", "decisions", "allowed", "level"), [
    (0.0, 7.9e21, [], True, None),                       # below 0.8
    (5e21, 3e21, [], False, 0.8),                        # exactly at 0.8: passes the level
    (5e21, 2.9e21, [], True, None),
    (5e21, 3e21, [_d("stays_downstream_modifier")], True, 0.8),
    (5e21, 5e21, [_d("stays_downstream_modifier")], True, 1.0),   # up to the threshold itself
    (5e21, 5.1e21, [_d("stays_downstream_modifier")], False, 1.0),
    (5e21, 4e21, [_d("stays_downstream_modifier", 0.85)], False, 0.8),
    (5e21, 3.5e21, [_d("stays_downstream_modifier", 0.85)], True, 0.8),
    (9e21, 6e21, [_d("approved_to_continue", 1.5)], True, 1.0),
    (9e21, 7e21, [_d("approved_to_continue", 1.5)], False, 1.0),
    (9e21, 1e24, [_d("becomes_provider")], True, 1.0),
    (0.0, 1.0, [_d("becomes_provider"), _d("halt", seq=2)], False, None),  # halt stops all
    (9e21, 1e21, [_d("halt"), _d("approved_to_continue", 2.0, 2)], True, 1.0),  # latest wins
])
def test_gate(done: float, planned: float, decisions: list[Decision], allowed: bool,
              level: float | None) -> None:
    r = evaluate_gate("p", done, planned, TH, (0.8, 1.0), decisions)
    assert r.allowed is allowed, r.reason
    assert r.level_reached == level
    assert r.exit_code == (0 if allowed else 1)
    assert r.ratio_after == pytest.approx((done + planned) / 1e22)
    if not allowed:
        assert r.reason.startswith("REFUSED")
        if not decisions:
            assert "no decision is recorded" in r.reason and "gpuflops decide" in r.reason


def test_gate_rejects_bad_planned_figures() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            evaluate_gate("p", 0.0, bad, TH, (0.8,), [])


def test_planned_flops_from_estimate_output() -> None:
    doc = parse_estimate('{"estimates": {"full": {"total": 4.2e19}, "lora": {"total": 1e19}}}')
    assert planned_from_estimate(doc, "lora") == 1e19
    with pytest.raises(ValueError, match="choose one with --method"):
        planned_from_estimate(doc, None)
    with pytest.raises(ValueError, match="no method 'qlora'"):
        planned_from_estimate(doc, "qlora")
    with pytest.raises(ValueError, match="not JSON"):
        parse_estimate("nope")
    assert planned_from_estimate(parse_estimate('{"estimates": {"full": {"total": 5}}}'), None) == 5.0
    both = parse_estimate('{"estimates": {"full": {"total": 5, "total_excluding_recompute": 4}}}')
    assert planned_from_estimate(both, None, exclude_recompute=True) == 4.0
    assert planned_from_estimate(both, None) == 5.0
    with pytest.raises(ValueError, match="no valid total_excluding_recompute"):
        planned_from_estimate(doc, "lora", exclude_recompute=True)
