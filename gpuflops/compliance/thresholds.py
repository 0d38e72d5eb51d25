"""EU AI Act modification thresholds, per-program configuration and program roll-ups.

Source: the Commission's guidelines for providers of general-purpose AI models (July 2025): a
downstream modifier becomes a provider when the modification's training compute exceeds one
third of the original model's training compute; when that is unknown, one third of 1e23 FLOPs
(the GPAI presumption); for a model with systemic risk, one third of 1e25 FLOPs.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuflops.compliance.reconcile import (
    DEFAULT_TOLERANCE,
    PRECISION_RATE,
    CompliancePolicy,
    ReconcileResult,
)

GPAI_PRESUMPTION_FLOPS = 1e23
SYSTEMIC_RISK_FLOPS = 1e25
RULES: Mapping[str, str] = {
    "one_third_of_base": "one third of the base model's training compute (guidelines)",
    "conservative_30pct": "30% of the base model's training compute (conservative preset)",
    "unknown_base": "base compute unknown: one third of 1e23 FLOPs",
    "systemic_risk_base": "systemic-risk base model: one third of 1e25 FLOPs",
    "explicit": "explicit threshold set in the program configuration",
}
RULE_CHOICES = ("auto", "guidelines", "conservative", *RULES)
DEFAULT_LEVELS = (0.5, 0.8, 0.95)


class ProgramConfigError(ValueError):
    """A program configuration file or value is invalid; carries where."""


@dataclass(frozen=True)
class ProgramConfig:
    """Per-program threshold rule, approach levels, reconciliation and compliance policy.

    ``rule``: ``auto``/``guidelines`` (systemic -> systemic_risk_base, base known ->
    one_third_of_base, else unknown_base), ``conservative`` (as auto but 30% of a known base),
    or a rule name from RULES.
    """

    program: str
    rule: str = "auto"
    base_model_compute_flops: float | None = None
    base_model_compute_source: str | None = None
    systemic_risk: bool | None = None
    threshold_flops: float | None = None
    levels: tuple[float, ...] = DEFAULT_LEVELS
    tolerance: float = DEFAULT_TOLERANCE
    assumed_precision: str = "bf16"
    policy: CompliancePolicy = field(default_factory=CompliancePolicy)

    def __post_init__(self) -> None:
        if self.rule not in RULE_CHOICES:
            raise ProgramConfigError(f"program {self.program!r}: unknown rule {self.rule!r}; "
                              f"choose one of {', '.join(RULE_CHOICES)}")
        if self.rule == "explicit" and not self.threshold_flops:
            raise ProgramConfigError(f"program {self.program!r}: rule explicit needs threshold_flops")
        for name in ("base_model_compute_flops", "threshold_flops"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise ProgramConfigError(f"program {self.program!r}: {name} must be > 0, got {v!r}")
        if not self.levels or any(not 0 < x <= 1 for x in self.levels):
            raise ProgramConfigError(f"program {self.program!r}: levels must be in (0, 1]")
        if not 0 < self.tolerance < 1:
            raise ProgramConfigError(f"program {self.program!r}: tolerance must be in (0, 1)")
        if self.assumed_precision not in PRECISION_RATE:
            raise ProgramConfigError(f"program {self.program!r}: unknown assumed_precision "
                              f"{self.assumed_precision!r}")


@dataclass(frozen=True)
class ProgramsConfig:
    """Defaults plus per-program overrides, as loaded from a TOML or JSON file."""

    defaults: Mapping[str, Any] = field(default_factory=dict)
    programs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_program(self, program: str) -> ProgramConfig:
        merged: dict[str, Any] = {**self.defaults, **self.programs.get(program, {})}
        policy = {**dict(self.defaults.get("policy", {})),
                  **dict(self.programs.get(program, {}).get("policy", {}))}
        merged.pop("policy", None)
        merged.pop("access", None)  # who may use the program: compliance/access.py
        known = set(ProgramConfig.__dataclass_fields__) - {"program", "policy"}
        unknown = set(merged) - known
        if unknown:
            raise ProgramConfigError(f"program {program!r}: unknown keys {sorted(unknown)}")
        unknown_p = set(policy) - set(CompliancePolicy.__dataclass_fields__)
        if unknown_p:
            raise ProgramConfigError(f"program {program!r}: unknown policy keys {sorted(unknown_p)}")
        if "levels" in merged:
            merged["levels"] = tuple(float(x) for x in merged["levels"])
        for key in ("base_model_compute_flops", "threshold_flops", "tolerance"):
            if merged.get(key) is not None:
                merged[key] = float(merged[key])
        try:
            return ProgramConfig(program=program, policy=CompliancePolicy(**policy), **merged)
        except (TypeError, ValueError) as exc:
            raise ProgramConfigError(str(exc)) from exc


def load_programs_config(path: Path | None) -> ProgramsConfig:
    """Read ``[defaults]`` and ``[programs.<name>]`` from TOML (or JSON by suffix)."""
    if path is None:
        return ProgramsConfig()
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ProgramConfigError(f"{path}: {exc}") from exc
    extra = set(data) - {"defaults", "programs"}
    if extra:
        raise ProgramConfigError(f"{path}: unknown top-level keys {sorted(extra)}")
    cfg = ProgramsConfig(defaults=data.get("defaults", {}), programs=data.get("programs", {}))
    for name in cfg.programs:
        cfg.for_program(name)  # validate every program now, not at the first scrape
    from gpuflops.compliance.access import check_access

    check_access(cfg)  # user and group names resolve now, not at the first registration
    return cfg


@dataclass(frozen=True)
class Threshold:
    """The threshold that applies to a program and why."""

    rule: str
    flops: float
    description: str
    base_model_compute_flops: float | None
    base_model_compute_source: str | None
    systemic_risk: bool


def _first(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def resolve_threshold(cfg: ProgramConfig,
                      job_metadata: Sequence[Mapping[str, Any]] = ()) -> Threshold:
    """Pick the rule and threshold; configuration wins over what jobs registered."""
    base = cfg.base_model_compute_flops
    source = cfg.base_model_compute_source
    if base is None:
        for meta in job_metadata:
            # The job socket's names (docs/protocol.md) and the config file's names.
            v = meta.get("base_model_flops", meta.get("base_model_compute_flops"))
            if isinstance(v, int | float) and math.isfinite(v) and v > 0:
                base = float(v)
                source = (meta.get("base_model_flops_source")
                          or meta.get("base_model_compute_source") or "registered by a job")
                break
    systemic = cfg.systemic_risk
    if systemic is None:
        systemic = any(m.get("systemic_risk") is True for m in job_metadata)
    rule = cfg.rule
    if rule in ("auto", "guidelines", "conservative"):
        if systemic:
            rule = "systemic_risk_base"
        elif base is not None:
            rule = "conservative_30pct" if cfg.rule == "conservative" else "one_third_of_base"
        else:
            rule = "unknown_base"
    if rule in ("one_third_of_base", "conservative_30pct") and base is None:
        raise ProgramConfigError(f"program {cfg.program!r}: rule {rule} needs the base model's compute")
    flops = {
        "one_third_of_base": (base or 0.0) / 3.0,
        "conservative_30pct": (base or 0.0) * 0.3,
        "unknown_base": GPAI_PRESUMPTION_FLOPS / 3.0,
        "systemic_risk_base": SYSTEMIC_RISK_FLOPS / 3.0,
        "explicit": cfg.threshold_flops or 0.0,
    }[rule]
    return Threshold(rule=rule, flops=flops, description=RULES[rule],
                     base_model_compute_flops=base, base_model_compute_source=source,
                     systemic_risk=bool(systemic))


@dataclass(frozen=True)
class ProgramStatus:
    """A program's roll-up: the values the exporter and the report publish."""

    program: str
    flops_by_basis: Mapping[str, float]  # measured / analytic / compliance
    threshold: Threshold
    ratio: float  # compliance / threshold
    levels: tuple[float, ...]
    level_reached: float | None  # highest approach level reached, None below the first
    decision: str  # "downstream_modifier" or "provider_review_required"
    decision_reason: str
    jobs: tuple[ReconcileResult, ...]
    policy: CompliancePolicy

    @property
    def band(self) -> float | None:
        """The compliance figure's relative uncertainty: its jobs' bands, weighted by FLOPs;
        None when a job's is unknown (an estimate nothing measured)."""
        total = sum(j.compliance_flops for j in self.jobs)
        if any(j.band is None for j in self.jobs if j.compliance_flops > 0):
            return None
        if total <= 0:
            return 0.0
        return sum((j.band or 0.0) * j.compliance_flops for j in self.jobs) / total

    def metric_values(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Samples for gpuflops_program_{flops_total,threshold_flops,threshold_ratio}."""
        return {
            "gpuflops_program_flops_total": [
                ({"program": self.program, "basis": b}, v)
                for b, v in sorted(self.flops_by_basis.items())],
            "gpuflops_program_threshold_flops": [
                ({"program": self.program, "rule": self.threshold.rule}, self.threshold.flops)],
            "gpuflops_program_threshold_ratio": [({"program": self.program}, self.ratio)],
            "gpuflops_program_compliance_band_ratio": [] if self.band is None else [
                ({"program": self.program}, self.band)],
        }


def program_status(cfg: ProgramConfig, jobs: Sequence[ReconcileResult],
                   job_metadata: Sequence[Mapping[str, Any]] = ()) -> ProgramStatus:
    """Roll reconciled jobs up into a program total, compare with its threshold, decide."""
    threshold = resolve_threshold(cfg, job_metadata)
    measured = sum(j.measured_flops for j in jobs)
    analytic = sum(j.analytic_flops for j in jobs)
    compliance = sum(j.compliance_flops for j in jobs)
    ratio = compliance / threshold.flops
    reached = [lv for lv in sorted(cfg.levels) if ratio >= lv]
    flagged = [j.job for j in jobs if j.flagged]
    if ratio > 1.0:
        decision = "provider_review_required"
        reason = (f"compliance figure {compliance:.3e} FLOPs exceeds the threshold "
                  f"{threshold.flops:.3e} FLOPs ({threshold.description})")
    else:
        decision = "downstream_modifier"
        reason = (f"compliance figure {compliance:.3e} FLOPs is {ratio:.3g} ({ratio:.1%}) of the "
                  f"threshold "
                  f"{threshold.flops:.3e} FLOPs ({threshold.description})")
    if flagged:
        reason += f"; reconciliation flags on jobs {', '.join(sorted(flagged))} need review"
    return ProgramStatus(
        program=cfg.program,
        flops_by_basis={"measured": measured, "analytic": analytic, "compliance": compliance},
        threshold=threshold, ratio=ratio, levels=tuple(sorted(cfg.levels)),
        level_reached=reached[-1] if reached else None, decision=decision,
        decision_reason=reason, jobs=tuple(jobs), policy=cfg.policy)
