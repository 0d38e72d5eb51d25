"""Threshold presets, program configuration files and program roll-ups."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflops.compliance.programs import evaluate_program
from gpuflops.compliance.reconcile import JobInput
from gpuflops.compliance.thresholds import (
    ProgramConfig,
    ProgramConfigError,
    ProgramsConfig,
    load_programs_config,
    resolve_threshold,
)


def test_presets() -> None:
    base = 3.8e24
    assert resolve_threshold(ProgramConfig("p", base_model_compute_flops=base)).flops == \
        pytest.approx(base / 3)
    t = resolve_threshold(ProgramConfig("p", rule="conservative", base_model_compute_flops=base))
    assert (t.rule, t.flops) == ("conservative_30pct", pytest.approx(0.3 * base))
    t = resolve_threshold(ProgramConfig("p"))
    assert (t.rule, t.flops) == ("unknown_base", pytest.approx(3.333e22, rel=1e-3))
    t = resolve_threshold(ProgramConfig("p"), [{"systemic_risk": True}])
    assert (t.rule, t.flops) == ("systemic_risk_base", pytest.approx(3.333e24, rel=1e-3))
    t = resolve_threshold(ProgramConfig("p"), [{"base_model_compute_flops": 6e23,
                                               "base_model_compute_source": "model card"}])
    assert (t.rule, t.flops, t.base_model_compute_source) == \
        ("one_third_of_base", pytest.approx(2e23), "model card")
    with pytest.raises(ProgramConfigError):
        resolve_threshold(ProgramConfig("p", rule="one_third_of_base"))
    with pytest.raises(ProgramConfigError):
        ProgramConfig("p", rule="explicit")


def test_toml_config(tmp_path: Path) -> None:
    cfg_file = tmp_path / "programs.toml"
    cfg_file.write_text("""
[defaults]
levels = [0.5, 0.8, 0.95]
[defaults.policy]
basis = "max"

[programs.llama-ft]
rule = "conservative"
base_model_compute_flops = 1e24
tolerance = 0.2
[programs.llama-ft.policy]
exclude_recompute = true
""")
    cfg = load_programs_config(cfg_file)
    p = cfg.for_program("llama-ft")
    assert (p.rule, p.tolerance, p.policy.basis, p.policy.exclude_recompute) == \
        ("conservative", 0.2, "max", True)
    assert cfg.for_program("other").rule == "auto"
    bad = tmp_path / "bad.toml"
    bad.write_text('[programs.x]\nrule = "half"\n')
    with pytest.raises(ProgramConfigError, match="unknown rule"):
        load_programs_config(bad)
    bad.write_text('[programs.x]\nthreshhold = 1\n')
    with pytest.raises(ProgramConfigError, match="unknown keys"):
        load_programs_config(bad)
    bad.write_text("[programs.x\n")
    with pytest.raises(ProgramConfigError):
        load_programs_config(bad)


def test_program_rollup_levels_and_decision() -> None:
    config = ProgramsConfig(programs={"p": {"threshold_flops": 1e21, "rule": "explicit"}})
    jobs = [JobInput("a", "p", 4e20, 4e20, 0.0), JobInput("b", "p", 4.5e20, 4.4e20, 0.0),
            JobInput("c", "other", 9e21, 0.0, 0.0)]
    s = evaluate_program("p", jobs, config)
    assert s.flops_by_basis["measured"] == pytest.approx(8.5e20)
    # Reconciled: both jobs' analytic figures are confirmed by their counters.
    assert s.ratio == pytest.approx(0.84)
    assert s.level_reached == 0.8
    assert s.decision == "downstream_modifier"
    values = s.metric_values()
    assert values["gpuflops_program_threshold_flops"] == [({"program": "p", "rule": "explicit"},
                                                           1e21)]
    assert ({"program": "p", "basis": "compliance"}, pytest.approx(8.4e20)) in \
        values["gpuflops_program_flops_total"]
    over = evaluate_program("p", [*jobs, JobInput("d", "p", 2e20, 0.0, 0.0)], config)
    assert over.decision == "provider_review_required"
    assert "explicit" in over.decision_reason
