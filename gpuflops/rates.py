"""Dense FLOPs per clock per SM, by GPU family and precision, each with its source.

The counters say *how busy* a pipe was; this table says *how much work* a fully busy pipe does
per SM per clock. A multiply-accumulate counts as two FLOPs. Figures are dense (no 2:4
sparsity): sparse kernels still occupy the pipe for the dense number of cycles.

Derivation for a datasheet figure: rate = peak FLOP/s / (SM count x boost clock). Where we
measured the rate on real hardware, the source says so (``../shared/gpu-facts.md``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpuflops.model import GpuInfo, Pipe

# HMMA precisions the counters cannot tell apart; a job (or the config) says which it was.
HMMA_PRECISIONS = ("fp4", "fp8", "bf16", "fp16", "tf32")
DEFAULT_HMMA_PRECISION = "bf16"


@dataclass(frozen=True)
class Rate:
    flops_per_clock_per_sm: int
    source: str


@dataclass(frozen=True)
class Family:
    """A GPU family: an architecture, sometimes split by chip (GA100 vs GA10x)."""

    name: str
    architecture: str
    cores_per_sm: int  # CUDA cores per SM, to derive the SM count from nvmlDeviceGetNumGpuCores
    rates: Mapping[str, Rate]  # key: "<pipe>:<precision>"
    # One busy cycle of ``sm__pipe_tensor_cycles_active.sum`` (summed over SM sub-partitions)
    # is worth rate / this many FLOPs on the family's full-rate tensor path; None where that
    # has not been measured, and then tensor cycles are not used for FLOPs.
    tensor_cycle_divisor: int | None = None
    # The highest SM clock any part of the family runs at (boost, rounded up): with the best
    # rate it gives the physical peak that bounds jobs' analytic reports.
    max_clock_hz: float = 0.0


def _r(value: int, source: str) -> Rate:
    return Rate(value, source)


_H100_DS = "NVIDIA H100 datasheet (SXM5: 132 SMs, 1.98 GHz boost)"
_H100_MEAS = "measured on H100 SXM5 against exact GEMM FLOP counts (shared/gpu-facts.md)"
_A100_DS = "NVIDIA A100 datasheet (108 SMs, 1.41 GHz boost)"
_ADA_DS = "NVIDIA L40S/L4 datasheets and Ada whitepaper (dense)"
_V100_DS = "NVIDIA V100 SXM2 datasheet (80 SMs, 1.53 GHz boost)"
_B200_DS = "NVIDIA Blackwell B200 datasheet (148 SMs, dense)"

FAMILIES: Mapping[str, Family] = {
    "volta": Family(
        "volta",
        "volta",
        64,
        {
            "hmma:fp16": _r(1024, _V100_DS + ": 125 TFLOP/s tensor"),
            "hmma:bf16": _r(1024, _V100_DS + ": treated as fp16 (no bf16 tensor support)"),
            "fp32:fp32": _r(128, _V100_DS + ": 15.7 TFLOP/s FP32"),
            "fp64:fp64": _r(64, _V100_DS + ": 7.8 TFLOP/s FP64"),
            "fp16:fp16": _r(256, _V100_DS + ": 31.4 TFLOP/s FP16 non-tensor"),
        },
        max_clock_hz=1.6e9,  # V100S 1.597 GHz
    ),
    "ampere-ga100": Family(
        "ampere-ga100",
        "ampere",
        64,
        {
            "hmma:tf32": _r(1024, _A100_DS + ": 156 TFLOP/s TF32 dense"),
            "hmma:fp16": _r(2048, _A100_DS + ": 312 TFLOP/s FP16 dense"),
            "hmma:bf16": _r(2048, _A100_DS + ": 312 TFLOP/s BF16 dense"),
            "imma:int8": _r(4096, _A100_DS + ": 624 TOP/s INT8 dense"),
            "dfma:fp64": _r(128, _A100_DS + ": 19.5 TFLOP/s FP64 tensor"),
            "fp32:fp32": _r(128, _A100_DS + ": 19.5 TFLOP/s FP32"),
            "fp64:fp64": _r(64, _A100_DS + ": 9.7 TFLOP/s FP64"),
            "fp16:fp16": _r(512, "NVIDIA A100 whitepaper: 78 TFLOP/s FP16 non-tensor"),
        },
        max_clock_hz=1.5e9,  # A100 1.41 GHz
    ),
    "ampere-ga10x": Family(
        "ampere-ga10x",
        "ampere",
        128,
        {
            "hmma:tf32": _r(512, "NVIDIA A10/A40 datasheets: TF32 dense = 1/2 FP16"),
            "hmma:fp16": _r(1024, "NVIDIA A10 datasheet (72 SMs, 1.695 GHz): 125 TFLOP/s FP16"),
            "hmma:bf16": _r(1024, "NVIDIA A10 datasheet: 125 TFLOP/s BF16 dense"),
            "imma:int8": _r(2048, "NVIDIA A10 datasheet: 250 TOP/s INT8 dense"),
            "fp32:fp32": _r(256, "NVIDIA GA102 whitepaper: 128 FP32 lanes/SM"),
            "fp64:fp64": _r(4, "NVIDIA GA102 whitepaper: FP64 at 1/64 FP32"),
            "fp16:fp16": _r(256, "NVIDIA GA102 whitepaper: FP16 non-tensor = FP32 rate"),
        },
        max_clock_hz=2.0e9,  # RTX 3090 Ti 1.86 GHz
    ),
    "ada": Family(
        "ada",
        "ada",
        128,
        {
            "hmma:tf32": _r(512, _ADA_DS + ": TF32 dense = 1/2 FP16"),
            "hmma:fp16": _r(1024, _ADA_DS + ": L40S 362 TFLOP/s FP16 dense, 142 SMs, 2.52 GHz"),
            "hmma:bf16": _r(1024, _ADA_DS + ": BF16 dense = FP16"),
            "hmma:fp8": _r(2048, _ADA_DS + ": FP8 dense = 2x FP16"),
            "imma:int8": _r(2048, _ADA_DS + ": INT8 dense = FP8"),
            "fp32:fp32": _r(256, _ADA_DS + ": 128 FP32 lanes/SM"),
            "fp64:fp64": _r(4, _ADA_DS + ": FP64 at 1/64 FP32"),
            "fp16:fp16": _r(256, _ADA_DS + ": FP16 non-tensor = FP32 rate"),
        },
        max_clock_hz=2.7e9,  # RTX 4090 / L40S 2.52 GHz
    ),
    "hopper": Family(
        "hopper",
        "hopper",
        128,
        {
            "hmma:tf32": _r(2048, _H100_MEAS + ": 0.995 at 2048; datasheet 495 TFLOP/s dense"),
            "hmma:fp16": _r(4096, _H100_MEAS + ": 0.959-1.019 at 4096; datasheet 989 TFLOP/s"),
            "hmma:bf16": _r(4096, _H100_MEAS + ": 0.974-0.990 at 4096; datasheet 989 TFLOP/s"),
            "hmma:fp8": _r(8192, _H100_MEAS + ": 0.984-1.011 at 8192; datasheet 1979 TFLOP/s"),
            # int8 measured 2.11x against torch._int_mm at 8192 (gpu-facts): unresolved, so the
            # datasheet figure stands and docs/backends.md flags IMMA as unvalidated.
            "imma:int8": _r(8192, _H100_DS + ": 1979 TOP/s INT8 dense (unvalidated, see docs)"),
            "dfma:fp64": _r(256, _H100_MEAS + ": 0.993 at 256; datasheet 67 TFLOP/s FP64 tensor"),
            "fp32:fp32": _r(256, _H100_MEAS + ": 0.991 at 256; datasheet 67 TFLOP/s FP32"),
            "fp64:fp64": _r(128, _H100_DS + ": 34 TFLOP/s FP64 non-tensor"),
            "fp16:fp16": _r(512, "NVIDIA H100 whitepaper: 134 TFLOP/s FP16 non-tensor"),
        },
        # H200, run 21: Nsight Compute's executed tensor ops per tensor-pipe cycle were 1024
        # for bf16 wgmma (4096 / 4), 2048 for fp8 and 512 for tf32, on every Hopper-path kernel
        # (benchmarks/results/h200-run21-ncu-kernels.json).
        tensor_cycle_divisor=4,
        max_clock_hz=2.0e9,  # H100/H200 SXM 1.98 GHz
    ),
    "blackwell": Family(
        "blackwell",
        "blackwell",
        128,
        {
            "hmma:tf32": _r(4096, _B200_DS + ": TF32 dense"),
            "hmma:fp16": _r(8192, _B200_DS + ": FP16 dense"),
            "hmma:bf16": _r(8192, _B200_DS + ": BF16 dense"),
            "hmma:fp8": _r(16384, _B200_DS + ": FP8 dense"),
            "hmma:fp4": _r(32768, _B200_DS + ": FP4 dense"),
            "fp32:fp32": _r(256, _B200_DS + ": 128 FP32 lanes/SM"),
        },
        max_clock_hz=2.6e9,  # RTX 5090 2.41 GHz
    ),
}

# NVML's nvmlDeviceArchitecture_t codes; DCGM's dcgmChipArchitecture_t uses the same values.
ARCHITECTURE_CODES: Mapping[int, str] = {
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
}

# Chips of the Ampere architecture that are GA100 (A100, A30); every other Ampere is GA10x.
# Whole model numbers only: "RTX A1000" and "RTX A3000" are GA10x parts.
_GA100_NAME = re.compile(r"\b(A100X?|A30X?|A800|PG506)\b")


def family_for(architecture: str, name: str) -> Family | None:
    """The rate family of a GPU from NVML's architecture and the marketing name."""
    arch = architecture.lower()
    if arch == "ampere":
        key = "ampere-ga100" if _GA100_NAME.search(name) else "ampere-ga10x"
        return FAMILIES[key]
    return FAMILIES.get(arch)


def pipe_precision(pipe: Pipe, hmma_precision: str) -> str:
    """The precision label of work on a pipe; HMMA's comes from config or the job."""
    if pipe is Pipe.HMMA:
        return hmma_precision
    if pipe is Pipe.IMMA:
        return "int8"
    if pipe in (Pipe.DFMA, Pipe.FP64):
        return "fp64"
    return pipe.value


# No GPU's SMs run faster than this: a reported clock above it is not a measurement.
MAX_SM_CLOCK_HZ = 3.0e9
_MAX_SMS = 256  # more SMs than any unit has, for a unit whose SM count is unknown


def peak_flops_per_s(info: GpuInfo) -> float:
    """The most FLOPs per second one unit can execute: its family's best dense rate on any
    pipe and precision x its SMs x the family's top clock. A unit of an unknown family gets
    the best rate of any family at MAX_SM_CLOCK_HZ: an upper bound is what this is for."""
    family = family_for(info.architecture, info.name)
    sms = info.sm_count or _MAX_SMS
    if family is None or not family.max_clock_hz:
        best = max(r.flops_per_clock_per_sm for f in FAMILIES.values() for r in f.rates.values())
        return float(best) * sms * MAX_SM_CLOCK_HZ
    best = max(r.flops_per_clock_per_sm for r in family.rates.values())
    return float(best) * sms * family.max_clock_hz


def rate_for(family: Family, pipe: Pipe, precision: str) -> Rate | None:
    """FLOPs/clock/SM for a pipe at a precision, or None when the table has no sourced figure."""
    return family.rates.get(f"{pipe.value}:{precision}")
