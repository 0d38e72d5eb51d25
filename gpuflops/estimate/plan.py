"""Where a planned run's FLOPs fall against the EU AI Act modification thresholds."""

from __future__ import annotations

from dataclasses import dataclass

from gpuflops.compliance.thresholds import GPAI_PRESUMPTION_FLOPS, SYSTEMIC_RISK_FLOPS


@dataclass(frozen=True)
class ThresholdCheck:
    """One threshold, the planned FLOPs' share of it and whether they cross it."""

    rule: str
    description: str
    threshold_flops: float
    ratio: float

    @property
    def exceeded(self) -> bool:
        return self.ratio > 1.0


def threshold_checks(flops: float, base_model_compute_flops: float | None = None
                     ) -> list[ThresholdCheck]:
    """Compare ``flops`` with every threshold that applies (Commission guidelines, July 2025)."""
    rules: list[tuple[str, str, float]] = [
        ("unknown_base", "base compute unknown: 1/3 of 1e23 FLOPs", GPAI_PRESUMPTION_FLOPS / 3),
        ("systemic_risk_base", "systemic-risk base: 1/3 of 1e25 FLOPs", SYSTEMIC_RISK_FLOPS / 3),
    ]
    if base_model_compute_flops is not None:
        c = base_model_compute_flops
        rules += [("one_third_of_base", f"1/3 of the base model's {c:.3g} FLOPs", c / 3),
                  ("conservative_30pct", f"30% of the base model's {c:.3g} FLOPs", 0.3 * c)]
    return [ThresholdCheck(rule, text, value, flops / value) for rule, text, value in rules]
