"""Reconciliation: ratio, precision inference, checkpointing, compliance policy."""

from __future__ import annotations

import pytest

from gpuflops.compliance.reconcile import (
    CompliancePolicy,
    JobInput,
    infer_precision,
    normalize_precision,
    reconcile_job,
)

# A 7B model fine-tuned on 2e9 tokens: 6·N·D forward+backward, 8·N·D with full checkpointing.
N = 7e9
D = 2e9


def job(measured: float, analytic: float, recompute: float, **meta: object) -> JobInput:
    return JobInput(job="j", program="p", measured_flops=measured, analytic_flops=analytic,
                    recompute_flops=recompute, tokens=D, metadata=meta)


def codes(result: object) -> set[str]:
    return {f.code for f in result.findings}  # type: ignore[attr-defined]


def test_estimate_that_left_out_checkpointing_is_flagged() -> None:
    r = reconcile_job(job(8 * N * D, 6 * N * D, 0.0, activation_checkpointing=True,
                          precision="bf16-mixed"))
    assert r.ratio == pytest.approx(4 / 3)
    assert r.divergent
    assert "checkpointing_omitted" in codes(r)
    assert r.flagged


def test_correct_estimate_with_checkpointing_is_not_flagged() -> None:
    r = reconcile_job(job(8 * N * D * 1.04, 8 * N * D, 2 * N * D, activation_checkpointing=True,
                          precision="bf16-mixed"))
    assert r.ratio == pytest.approx(1.04)
    assert not r.divergent
    assert not r.flagged, r.findings
    assert r.inferred_precision == "bf16"
    assert r.analytic_without_recompute_flops == pytest.approx(6 * N * D)


@pytest.mark.parametrize("seq", [2048, 10**9])
def test_fused_attention_recomputation_is_not_checkpointing(seq: int) -> None:
    from gpuflops.estimate import ModelSpec, estimate

    # A fused kernel's score recomputation is the only recomputation without checkpointing;
    # at most 1/7 of the total even when attention is all the work (seq 1e9 here).
    spec = ModelSpec.from_param_count(N, num_layers=32, attention_dim=4096)
    e = estimate(spec, 10**6, seq_len=seq)
    assert 0 < e.recompute == e.attention_recompute < e.total / 7
    r = reconcile_job(job(e.total, e.total, e.recompute, activation_checkpointing=False,
                          precision="bf16-mixed"))
    assert not r.flagged, r.findings
    assert r.compliance_flops == pytest.approx(e.total_excluding_recompute)
    ckpt = estimate(spec, 10**6, seq_len=seq, activation_checkpointing=True)
    r = reconcile_job(job(ckpt.total, ckpt.total, ckpt.recompute,
                          activation_checkpointing=False, precision="bf16-mixed"))
    assert "recompute_without_checkpointing" in codes(r)


def test_fp8_job_measured_at_bf16_rate_reads_half_and_is_corrected_when_declared() -> None:
    r = reconcile_job(job(0.5 * 6 * N * D, 6 * N * D, 0.0, precision="fp8"))
    assert r.ratio == pytest.approx(0.5)
    assert r.inferred_precision == "fp8"
    assert r.correction_factor == 2.0
    assert r.compliance_flops == pytest.approx(6 * N * D)
    assert "precision" in codes(r)


def test_tf32_job_reads_double_and_is_not_corrected_without_declaration() -> None:
    r = reconcile_job(job(2 * 6 * N * D, 6 * N * D, 0.0))
    assert r.inferred_precision == "tf32"
    assert r.correction_factor == 1.0  # when_declared: nothing declared
    assert r.compliance_flops == pytest.approx(12 * N * D)
    always = reconcile_job(job(2 * 6 * N * D, 6 * N * D, 0.0),
                           policy=CompliancePolicy(precision_correction="always"))
    assert always.compliance_flops == pytest.approx(6 * N * D)


def test_declared_precision_contradicted_by_ratio_is_flagged() -> None:
    r = reconcile_job(job(0.5 * 6 * N * D, 6 * N * D, 0.0, precision="bf16"))
    assert "precision_mismatch" in codes(r)
    assert r.correction_factor == 1.0


def test_policies() -> None:
    inp = job(9e20, 8e20, 2e20, activation_checkpointing=True)
    # The default: counters confirm the analytic figure (9/8 within ±15%); without recompute.
    default = reconcile_job(inp)
    assert default.compliance_flops == pytest.approx(6e20)
    assert default.basis_used == "analytic_confirmed" and default.band == 0.15
    assert reconcile_job(inp, policy=CompliancePolicy(basis="measured", exclude_recompute=False)
                         ).compliance_flops == pytest.approx(9e20)
    assert reconcile_job(inp, policy=CompliancePolicy(basis="analytic", exclude_recompute=False)
                         ).compliance_flops == \
        pytest.approx(8e20)
    assert reconcile_job(inp, policy=CompliancePolicy(basis="max", exclude_recompute=True)
                         ).compliance_flops == pytest.approx(7e20)
    with pytest.raises(ValueError):
        CompliancePolicy(basis="median")  # type: ignore[arg-type]


def test_no_estimate_and_matched_window() -> None:
    r = reconcile_job(job(1e18, 0.0, 0.0))
    assert r.ratio is None and "no_estimate" in codes(r) and not r.flagged
    windowed = JobInput(job="j", program="p", measured_flops=5e18, analytic_flops=1e18,
                        recompute_flops=0.0, matched_measured_flops=1.1e18)
    assert reconcile_job(windowed).ratio == pytest.approx(1.1)


@pytest.mark.parametrize(("ratio", "expected"), [(1.0, "bf16"), (0.52, "fp8"), (1.9, "tf32"),
                                                 (0.26, "fp4"), (1.4, None), (0.7, None)])
def test_infer_precision(ratio: float, expected: str | None) -> None:
    assert infer_precision(ratio, "bf16", 0.3) == expected


def test_normalize_precision() -> None:
    assert normalize_precision("bf16-mixed") == "bf16"
    assert normalize_precision("torch.float8_e4m3fn") == "fp8"
    assert normalize_precision("16-mixed") == "fp16"
    assert normalize_precision("32-true") is None
    assert normalize_precision(None) is None
