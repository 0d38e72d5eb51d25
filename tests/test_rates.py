"""Rate table: every figure sourced, families picked correctly, H100 rates as measured."""

from __future__ import annotations

import pytest

from gpuflops.model import Pipe
from gpuflops.rates import (
    DEFAULT_HMMA_PRECISION,
    FAMILIES,
    HMMA_PRECISIONS,
    family_for,
    pipe_precision,
    rate_for,
)


def test_every_rate_has_a_source_and_a_known_pipe() -> None:
    n = 0
    for fam in FAMILIES.values():
        assert fam.cores_per_sm in (64, 128)
        for key, rate in fam.rates.items():
            pipe, _, precision = key.partition(":")
            Pipe(pipe)  # raises for an unknown pipe
            assert precision
            assert rate.flops_per_clock_per_sm > 0
            assert len(rate.source) > 20, f"{fam.name} {key}: source too thin: {rate.source!r}"
            n += 1
    assert n >= 40


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("NVIDIA A100-SXM4-80GB", "ampere-ga100"),
        ("NVIDIA A100 80GB PCIe", "ampere-ga100"),
        ("NVIDIA A30", "ampere-ga100"),
        ("NVIDIA A800-SXM4-80GB", "ampere-ga100"),
        ("NVIDIA A10", "ampere-ga10x"),
        ("NVIDIA A40", "ampere-ga10x"),
        ("NVIDIA RTX A6000", "ampere-ga10x"),
        ("NVIDIA GeForce RTX 3090", "ampere-ga10x"),
        # GA107/GA104 laptop parts whose names contain "A100"/"A30" as a prefix of a longer model.
        ("NVIDIA RTX A1000 6GB Laptop GPU", "ampere-ga10x"),
        ("NVIDIA RTX A3000 Laptop GPU", "ampere-ga10x"),
    ],
)
def test_family_for_ampere_splits_ga100_from_ga10x(name: str, family: str) -> None:
    fam = family_for("ampere", name)
    assert fam is not None and fam.name == family


def test_family_for_other_architectures() -> None:
    h = family_for("Hopper", "NVIDIA H100 80GB HBM3")
    assert h is not None and h.name == "hopper"
    assert family_for("blackwell", "NVIDIA B200") is FAMILIES["blackwell"]
    assert family_for("unknown", "NVIDIA H100") is None
    assert family_for("kepler", "Tesla K80") is None


def test_h100_rates_match_gpu_facts() -> None:
    fam = family_for("hopper", "NVIDIA H100 80GB HBM3")
    assert fam is not None
    expect = {
        (Pipe.HMMA, "bf16"): 4096,
        (Pipe.HMMA, "fp16"): 4096,
        (Pipe.HMMA, "tf32"): 2048,
        (Pipe.HMMA, "fp8"): 8192,
        (Pipe.DFMA, "fp64"): 256,
        (Pipe.FP32, "fp32"): 256,
    }
    for (pipe, precision), value in expect.items():
        rate = rate_for(fam, pipe, precision)
        assert rate is not None and rate.flops_per_clock_per_sm == value, (pipe, precision)
    # The datasheet's dense bf16 peak follows from the rate: 132 SMs x 4096 x 1.83 GHz ~ 989 TFLOP/s.
    bf16 = rate_for(fam, Pipe.HMMA, "bf16")
    assert bf16 is not None
    assert 132 * bf16.flops_per_clock_per_sm * 1.83e9 == pytest.approx(989e12, rel=0.01)
    assert rate_for(fam, Pipe.HMMA, "fp4") is None  # Hopper has no FP4 tensor path


def test_precision_of_each_pipe() -> None:
    assert DEFAULT_HMMA_PRECISION in HMMA_PRECISIONS
    assert pipe_precision(Pipe.HMMA, "fp8") == "fp8"
    assert pipe_precision(Pipe.IMMA, "fp8") == "int8"
    assert pipe_precision(Pipe.DFMA, "bf16") == "fp64"
    assert pipe_precision(Pipe.FP64, "bf16") == "fp64"
    assert pipe_precision(Pipe.FP32, "bf16") == "fp32"
    assert pipe_precision(Pipe.FP16, "bf16") == "fp16"
