"""Reconcile measured FLOPs with the analytic estimate per job, and pick the compliance figure.

Measured FLOPs come from tensor-pipe activity times the peak FLOPs/clock/SM of an *assumed*
precision (default bf16). The counters cannot tell bf16 from FP8 or TF32 work, so:

- a job that really ran FP8 (2x the bf16 rate) did twice the FLOPs per active cycle: measured
  undercounts and ``measured / analytic`` is about 0.5; the true figure is measured x 2;
- a job that really ran TF32 (half the bf16 rate) shows ``measured / analytic`` about 2; the
  true figure is measured / 2;
- fp16 and bf16 run at the same rate: the ratio is about 1.

In general ``expected ratio = rate(assumed) / rate(actual)`` and the corrected measured figure is
``measured x rate(actual) / rate(assumed)``. See docs/ledger.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Dense tensor-core throughput relative to bf16 (Ampere/Hopper/Blackwell datasheets: TF32 is
# half the bf16 rate, fp16 equal, FP8 twice, FP4 four times).
PRECISION_RATE: Mapping[str, float] = {
    "tf32": 0.5, "fp16": 1.0, "bf16": 1.0, "fp8": 2.0, "fp4": 4.0,
}
DEFAULT_TOLERANCE = 0.30  # the guidelines' accuracy margin for compute estimates
# How close the hardware figure must come to the analytic one for the counters to confirm it.
# The real-training suite (docs/accuracy.md) puts hardware/analytic at 0.90-1.0x on H200s with
# PM counters: causal attention kernels skip the masked half of the score matrix the formula
# counts, and kernels pad their tiles; 15% holds those with room, and a job under-reporting by
# more than that is caught and counted on its hardware figure instead.
DEFAULT_AGREEMENT = 0.15
# Without checkpointing the only recomputation is a fused attention kernel's: its backward
# recomputes the scores, 0.5x the attention forward, against at least 3.5x that forward in the
# analytic total (forward, 2x backward and the recomputation itself; gpuflops.estimate.formulas).
FUSED_ATTENTION_RECOMPUTE_MAX = 0.5 / 3.5
# Hardware figure's accuracy on the suite's real training jobs (H200, PM counters; docs/accuracy.md)
DEFAULT_HARDWARE_BAND = 0.05

Basis = Literal["reconciled", "measured", "analytic", "max"]
Correction = Literal["never", "when_declared", "always"]


@dataclass(frozen=True)
class CompliancePolicy:
    """Which figure counts toward the threshold (documented in docs/ledger.md).

    ``reconciled`` (the default): a job's analytic figure where the hardware counters confirm
    it within ``agreement``, else its hardware figure, flagged. Recomputation of activations
    is excluded by default, as the Commission's guidelines allow (Annex A).
    """

    basis: Basis = "reconciled"
    exclude_recompute: bool = True
    precision_correction: Correction = "when_declared"
    agreement: float = DEFAULT_AGREEMENT
    hardware_band: float = DEFAULT_HARDWARE_BAND

    def __post_init__(self) -> None:
        if self.basis not in ("reconciled", "measured", "analytic", "max"):
            raise ValueError("policy basis must be reconciled, measured, analytic or max, "
                             f"not {self.basis!r}")
        if not 0 < self.agreement < 1 or not 0 < self.hardware_band < 1:
            raise ValueError("policy agreement and hardware_band must be in (0, 1)")
        if self.precision_correction not in ("never", "when_declared", "always"):
            raise ValueError(
                f"precision_correction must be never, when_declared or always, "
                f"not {self.precision_correction!r}")

    def describe(self) -> str:
        basis = {"reconciled": f"analytic FLOPs where the counters confirm them within "
                               f"±{self.agreement:.0%}, else the hardware figure",
                 "measured": "hardware (measured) FLOPs", "analytic": "analytic FLOPs",
                 "max": "max(hardware, analytic) per job"}[self.basis]
        rec = ("activation recomputation excluded" if self.exclude_recompute
               else "activation recomputation included")
        corr = {"never": "no precision correction",
                "when_declared": "measured corrected for precision only when the inferred "
                                 "precision matches the job's declared precision",
                "always": "measured corrected to the inferred precision"}[self.precision_correction]
        return f"{basis}; {rec}; {corr}"


@dataclass(frozen=True)
class JobInput:
    """What reconciliation needs about one job; FLOPs are this ledger's (or cluster's) sums."""

    job: str
    program: str
    measured_flops: float
    analytic_flops: float  # total analytic work including recomputation
    recompute_flops: float  # the analytic activation-recomputation part of analytic_flops
    tokens: float = 0.0
    # Measured FLOPs inside the span the estimates cover; None when unknown (then the total).
    matched_measured_flops: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    hmma_flops: float = 0.0  # the tensor-core (HMMA) part of measured_flops
    half_rate_fraction: float | None = None  # the job's kernel-census claim, if it made one


@dataclass(frozen=True)
class Finding:
    """A reconciliation observation; ``flag`` findings need a human to look."""

    code: str
    message: str
    flag: bool


@dataclass(frozen=True)
class ReconcileResult:
    job: str
    program: str
    measured_flops: float
    analytic_flops: float
    recompute_flops: float
    analytic_without_recompute_flops: float
    ratio: float | None  # matched measured / analytic; the gauge gpuflops_job_reconcile_ratio
    divergent: bool
    assumed_precision: str
    declared_precision: str | None
    inferred_precision: str | None
    correction_factor: float  # applied to measured for the compliance figure
    corrected_measured_flops: float
    compliance_flops: float
    findings: tuple[Finding, ...]
    # Measured, precision-corrected, less what the job's kernel census says half-rate tensor
    # paths added (bounded: never below half the HMMA counts, the slowest path measured).
    hardware_flops: float = 0.0
    half_rate_fraction: float | None = None
    basis_used: str = "measured"  # analytic_confirmed | analytic_unconfirmed | hardware | ...
    band: float | None = None  # relative uncertainty of compliance_flops, when known

    @property
    def flagged(self) -> bool:
        return any(f.flag for f in self.findings)


def normalize_precision(value: object) -> str | None:
    """Map framework spellings ("bf16-mixed", "torch.float8_e4m3fn", "16-mixed") to a key."""
    if not isinstance(value, str) or not value:
        return None
    v = value.lower()
    for needle, key in (("fp8", "fp8"), ("float8", "fp8"), ("e4m3", "fp8"), ("e5m2", "fp8"),
                        ("fp4", "fp4"), ("bf16", "bf16"), ("bfloat16", "bf16"),
                        ("tf32", "tf32"), ("fp16", "fp16"), ("float16", "fp16"),
                        ("16-mixed", "fp16"), ("half", "fp16")):
        if needle in v:
            return key
    return None


def infer_precision(ratio: float, assumed: str, tolerance: float) -> str | None:
    """The precision whose expected ratio is nearest ``ratio``, if within tolerance."""
    if ratio <= 0 or not math.isfinite(ratio):
        return None
    base = PRECISION_RATE[assumed]
    best = min(PRECISION_RATE, key=lambda p: (abs(math.log(ratio * PRECISION_RATE[p] / base)),
                                               p != assumed))
    expected = base / PRECISION_RATE[best]
    if abs(ratio / expected - 1.0) > tolerance:
        return None
    # fp16 and bf16 share a rate: report the assumed one rather than an arbitrary twin.
    if PRECISION_RATE[best] == base:
        return assumed
    return best


def _truthy(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on", "full", "selective"):
            return True
        if low in ("0", "false", "no", "off", "none", ""):
            return False
    if isinstance(value, int | float):
        return bool(value)
    return None


def reconcile_job(inp: JobInput, *, assumed_precision: str = "bf16",
                  tolerance: float = DEFAULT_TOLERANCE,
                  policy: CompliancePolicy | None = None) -> ReconcileResult:
    """Compare measured and analytic FLOPs for one job and compute its compliance figure."""
    policy = policy or CompliancePolicy()
    if assumed_precision not in PRECISION_RATE:
        raise ValueError(f"unknown assumed precision {assumed_precision!r}")
    findings: list[Finding] = []
    meta = inp.metadata
    declared = normalize_precision(meta.get("precision"))
    matched = inp.measured_flops if inp.matched_measured_flops is None else \
        inp.matched_measured_flops
    ratio: float | None = None
    inferred: str | None = None
    divergent = False
    if inp.analytic_flops <= 0:
        findings.append(Finding("no_estimate", "no analytic estimate was reported", False))
    elif matched <= 0:
        findings.append(Finding("no_measurement",
                                "no measured FLOPs inside the estimated window", True))
    else:
        ratio = matched / inp.analytic_flops
        divergent = abs(ratio - 1.0) > tolerance
        inferred = infer_precision(ratio, assumed_precision, tolerance)
        if divergent:
            findings.append(Finding(
                "divergent", f"measured/analytic = {ratio:.3f}, beyond ±{tolerance:.0%}", True))
        if inferred is not None and inferred != assumed_precision:
            expect = PRECISION_RATE[assumed_precision] / PRECISION_RATE[inferred]
            findings.append(Finding(
                "precision", f"ratio {ratio:.3f} ≈ {expect:g} is what {inferred} tensor work "
                f"measured at the assumed {assumed_precision} rate gives; the job likely ran "
                f"{inferred}" + (f" (declared {declared})" if declared else ""), True))
        elif divergent:
            findings.append(Finding(
                "unexplained", "no tensor precision explains the ratio within tolerance", True))
        if declared and inferred and PRECISION_RATE.get(declared) != PRECISION_RATE[inferred]:
            findings.append(Finding(
                "precision_mismatch",
                f"declared precision {declared} but the ratio suggests {inferred}", True))

    ckpt = _truthy(meta.get("activation_checkpointing"))
    if ckpt and inp.analytic_flops > 0 and inp.recompute_flops <= 0:
        findings.append(Finding(
            "checkpointing_omitted",
            "the job uses activation checkpointing but its estimate has no recomputation "
            "term (6·N·D instead of about 8·N·D): the analytic figure is too low", True))
    elif ckpt is False and inp.recompute_flops > inp.analytic_flops * FUSED_ATTENTION_RECOMPUTE_MAX:
        findings.append(Finding(
            "recompute_without_checkpointing",
            "the estimate has more recomputation than fused attention's score recomputation "
            "can explain, but the job says checkpointing is off", True))

    factor = 1.0
    if inferred is not None and inferred != assumed_precision:
        apply = (policy.precision_correction == "always"
                 or (policy.precision_correction == "when_declared" and declared is not None
                     and PRECISION_RATE.get(declared) == PRECISION_RATE[inferred]))
        if apply:
            factor = PRECISION_RATE[inferred] / PRECISION_RATE[assumed_precision]
    corrected = inp.measured_flops * factor
    hardware, half = _path_corrected(corrected, inp.hmma_flops * factor, inp.half_rate_fraction,
                                     findings)
    measured_c = hardware
    analytic_c = inp.analytic_flops
    if policy.exclude_recompute:
        # The counters cannot separate recomputation; subtract the analytic term.
        measured_c = max(0.0, hardware - inp.recompute_flops)
        analytic_c = max(0.0, inp.analytic_flops - inp.recompute_flops)
    if policy.basis == "reconciled":
        compliance, basis_used, band = _reconciled(inp, ratio, corrected, hardware, measured_c,
                                                   analytic_c, policy, findings)
    else:
        compliance = {"measured": measured_c, "analytic": analytic_c,
                      "max": max(measured_c, analytic_c)}[policy.basis]
        basis_used = policy.basis
        band = policy.hardware_band if policy.basis == "measured" else None
    return ReconcileResult(
        job=inp.job, program=inp.program, measured_flops=inp.measured_flops,
        analytic_flops=inp.analytic_flops, recompute_flops=inp.recompute_flops,
        analytic_without_recompute_flops=max(0.0, inp.analytic_flops - inp.recompute_flops),
        ratio=ratio, divergent=divergent, assumed_precision=assumed_precision,
        declared_precision=declared, inferred_precision=inferred, correction_factor=factor,
        corrected_measured_flops=corrected, compliance_flops=compliance,
        findings=tuple(findings), hardware_flops=hardware, half_rate_fraction=half,
        basis_used=basis_used, band=band)


def _path_corrected(measured: float, hmma: float, fraction: float | None,
                    findings: list[Finding]) -> tuple[float, float | None]:
    """Measured less the half-rate path excess the job's census claims, and the fraction used.

    Busy tensor cycles count at the full-rate path's worth; a fraction f of the HMMA FLOPs done
    at half that per cycle took (1 + f) times the cycles, so the true HMMA work is hmma/(1 + f).
    A claim is a fraction in [0, 1], so no claim can take the HMMA figure below half its counts:
    512 ops a busy cycle is the slowest tensor path measured (ncu, run 21).
    """
    if fraction is None or hmma <= 0:
        return measured, fraction
    f = min(max(fraction, 0.0), 1.0)
    excess = hmma * f / (1.0 + f)
    findings.append(Finding(
        "half_rate_claim", f"the job's kernel census puts {f:.1%} of its tensor FLOPs on "
        f"half-rate kernels: hardware figure {excess:.3e} FLOPs below the raw counts", False))
    return measured - excess, f


def _reconciled(inp: JobInput, ratio: float | None, corrected: float, hardware: float,
                hardware_c: float, analytic_c: float, policy: CompliancePolicy,
                findings: list[Finding]) -> tuple[float, str, float | None]:
    """The reconciled figure, which basis it rests on, and its relative uncertainty."""
    if inp.analytic_flops <= 0:
        return hardware_c, "hardware", policy.hardware_band
    if ratio is None:  # an estimate but no measurement: nothing confirms it
        return analytic_c, "analytic_unconfirmed", None
    hw_ratio = ratio * (hardware / corrected) if corrected > 0 else ratio
    if abs(hw_ratio - 1.0) <= policy.agreement:
        return analytic_c, "analytic_confirmed", policy.agreement
    findings.append(Finding(
        "not_confirmed", f"hardware/analytic = {hw_ratio:.3f}, outside ±{policy.agreement:.0%}:"
        " the hardware figure counts", True))
    return hardware_c, "hardware", policy.hardware_band
