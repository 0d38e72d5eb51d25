"""The gate: may a planned run of a program start, given its compute so far and its decisions?

A run is refused when the program's compliance FLOPs plus the planned FLOPs reach a gate level
(a share of the program's threshold; default 0.8 and 1.0) that the latest recorded decision does
not cover. Decisions cover (journal.py): ``stays_downstream_modifier`` up to the threshold,
``approved_to_continue`` up to its ``up_to_ratio``, ``becomes_provider`` everything, ``halt``
nothing. Exit codes for pipelines: 0 allowed, 1 refused, 2 bad input, 3 cannot tell (store
unreachable or its records fail verification): the gate fails closed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpuflops.compliance.journal import Decision
from gpuflops.compliance.thresholds import Threshold

EXIT_ALLOWED = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_CANNOT_TELL = 3


@dataclass(frozen=True)
class GateResult:
    """The gate's answer and every figure behind it."""

    allowed: bool
    reason: str
    program: str
    compliance_flops: float
    planned_flops: float
    threshold_flops: float
    rule: str
    ratio_now: float
    ratio_after: float
    levels: tuple[float, ...]
    level_reached: float | None
    decision_seq: int | None
    decision_outcome: str | None
    covers_ratio: float | None

    @property
    def exit_code(self) -> int:
        return EXIT_ALLOWED if self.allowed else EXIT_REFUSED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["covers_ratio"] is not None and not math.isfinite(d["covers_ratio"]):
            d["covers_ratio"] = None if d["covers_ratio"] < 0 else "unlimited"
        d["levels"] = list(self.levels)
        return d


def _when(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _cover_text(d: Decision) -> str:
    c = d.covers_ratio
    limit = "no limit" if c == math.inf else ("nothing" if c == -math.inf else f"up to {c:.0%}")
    return f"decision #{d.seq} ({d.outcome}, by {d.by}, {_when(d.t_s)}; covers {limit})"


def evaluate_gate(program: str, compliance_flops: float, planned_flops: float,
                  threshold: Threshold, levels: Sequence[float],
                  decisions: Sequence[Decision]) -> GateResult:
    """Allow or refuse a run of ``planned_flops`` (see the module docstring)."""
    if not (math.isfinite(planned_flops) and planned_flops >= 0):
        raise ValueError(f"planned FLOPs must be a finite number >= 0, got {planned_flops!r}")
    levels = tuple(sorted(set(levels)))
    now = compliance_flops / threshold.flops
    after = (compliance_flops + planned_flops) / threshold.flops
    latest = decisions[-1] if decisions else None
    reached = [lv for lv in levels if after >= lv]
    level = reached[-1] if reached else None

    def result(allowed: bool, reason: str) -> GateResult:
        return GateResult(allowed, reason, program, compliance_flops, planned_flops,
                          threshold.flops, threshold.rule, now, after, levels, level,
                          None if latest is None else latest.seq,
                          None if latest is None else latest.outcome,
                          None if latest is None else latest.covers_ratio)

    figures = (f"{compliance_flops:.3e} FLOPs so far + {planned_flops:.3e} planned = "
               f"{after:.1%} of the {threshold.rule} threshold ({threshold.flops:.3e} FLOPs)")
    if latest is not None and latest.outcome == "halt":
        return result(False, f"REFUSED: program {program} is halted by {_cover_text(latest)}"
                             + (f": {latest.note}" if latest.note else ""))
    if level is None:
        first = f"{levels[0]:.0%}" if levels else "none configured"
        return result(True, f"allowed: {figures}, below the first gate level ({first})")
    if latest is not None and after <= latest.covers_ratio:
        return result(True, f"allowed: {figures}; past the {level:.0%} gate level, covered "
                            f"by {_cover_text(latest)}")
    why = ("no decision is recorded" if latest is None
           else f"the latest, {_cover_text(latest)}, does not reach that far")
    return result(False, f"REFUSED: {figures} would pass the {level:.0%} gate level and "
                         f"{why}. Record a decision first: gpuflops decide --program "
                         f"{program} --outcome ... --by ... --note ...")


def planned_from_estimate(doc: Mapping[str, Any], method: str | None,
                          exclude_recompute: bool = False) -> float:
    """The FLOPs of one method in ``gpuflops estimate --json`` output: its total, or with
    ``exclude_recompute`` (the compliance policy's default) its total less activation
    recomputation, which is what the program's compliance figure will count of the run."""
    estimates = doc.get("estimates") if isinstance(doc, Mapping) else None
    if not isinstance(estimates, Mapping) or not estimates:
        raise ValueError("not the output of `gpuflops estimate --json` (no estimates)")
    if method is None:
        if len(estimates) != 1:
            raise ValueError(f"the estimate has methods {sorted(estimates)}: choose one with "
                             "--method")
        method = next(iter(estimates))
    if method not in estimates:
        raise ValueError(f"the estimate has no method {method!r} (it has {sorted(estimates)})")
    key = "total_excluding_recompute" if exclude_recompute else "total"
    total = estimates[method].get(key)
    if not isinstance(total, int | float) or not math.isfinite(total) or total < 0:
        raise ValueError(f"estimate {method!r} has no valid {key}")
    return float(total)


def parse_estimate(text: str) -> Mapping[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the estimate is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("the estimate is not a JSON object")
    return doc
