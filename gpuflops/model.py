"""Domain types that flow through the pipeline, and the constants every layer shares.

sampler (GpuInfo, GpuSample) -> integrate (IntervalFlops) -> attribute (AttributedInterval of
Shares) -> label (FlopsRow) -> ledger and counters.

Everything here is immutable. Units are base SI units (seconds, hertz, bytes); backends convert
NVML's MHz, microseconds and percentages at their boundary. A quantity a backend could not
measure is ``None``: never NaN, never 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

# The job and program of work no job claimed (and the pseudo-program never compared with a
# threshold); exported as job="unattributed", program="unattributed" (docs/CONTRACTS.md).
UNATTRIBUTED = "unattributed"


# Where an interval's clock (and, on Hopper, its tensor work) came from: NVML's reported SM
# clock, or the SMs' own cycle counters read by CUPTI PM sampling (docs/accuracy.md).
COUNTER_SOURCE_NVML = "nvml"
COUNTER_SOURCE_PM = "cupti_pm"


class Pipe(str, Enum):
    """GPU execution pipes whose activity the counters report."""

    HMMA = "hmma"  # tensor cores, half/bf16/tf32/fp8 matrix multiply-accumulate
    IMMA = "imma"  # tensor cores, integer matrix multiply-accumulate
    DFMA = "dfma"  # tensor cores, fp64 matrix multiply-accumulate
    FP16 = "fp16"  # non-tensor FP16 pipe
    FP32 = "fp32"  # non-tensor FP32 pipe
    FP64 = "fp64"  # non-tensor FP64 pipe


class Metric(str, Enum):
    """Activity metrics a sampler reports as ratios in [0, 1] over an interval."""

    TENSOR_ANY = "tensor_any"
    HMMA = "hmma"
    IMMA = "imma"
    DFMA = "dfma"
    FP16 = "fp16"
    FP32 = "fp32"
    FP64 = "fp64"
    SM_ACTIVE = "sm_active"
    SM_OCCUPANCY = "sm_occupancy"


PIPE_METRIC: Mapping[Pipe, Metric] = {
    Pipe.HMMA: Metric.HMMA,
    Pipe.IMMA: Metric.IMMA,
    Pipe.DFMA: Metric.DFMA,
    Pipe.FP16: Metric.FP16,
    Pipe.FP32: Metric.FP32,
    Pipe.FP64: Metric.FP64,
}


@dataclass(frozen=True)
class GpuInfo:
    """Static facts about one measured unit: a whole GPU or one MIG GPU instance."""

    key: str  # stable label: "0" for GPU 0, "0/gi1" for GPU instance 1 on GPU 0
    index: int  # NVML index of the physical GPU
    uuid: str
    name: str
    architecture: str  # "volta", "ampere", "ada", "hopper", "blackwell", ... or "unknown"
    sm_count: int | None  # SMs in this unit (a MIG instance has fewer), None when unknown
    gpu_instance_id: int | None = None
    # Metrics this unit can report at all; empty when tensor activity is unavailable.
    metrics: frozenset[Metric] = field(default_factory=frozenset)
    # Why activity is unavailable, when it is ("GPM not supported on this GPU", ...).
    unavailable_reason: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A compute process seen on a GPU during an interval."""

    pid: int
    comm: str  # process name, from /proc/<pid>/comm; "" when it could not be read
    used_memory_bytes: int | None = None


@dataclass(frozen=True)
class ProcessUtilSample:
    """One per-process utilisation sample from the driver's ring buffer (~1 s windows)."""

    pid: int
    timestamp_s: float  # end of the sample's window, wall-clock seconds
    sm_util: float  # ratio in [0, 1] of the window during which this process had a kernel


@dataclass(frozen=True)
class GpuSample:
    """What one unit did over one interval [t0_s, t1_s].

    ``activity`` is None when the interval is a gap (the counters could not be read); the
    integrator then counts the gap and never integrates it. ``clock_hz`` is the mean SM clock
    over the interval from ``clock_reads`` evenly spaced reads.
    """

    key: str
    t0_s: float
    t1_s: float
    activity: Mapping[Metric, float] | None
    clock_hz: float | None
    clock_reads: int = 0
    processes: tuple[ProcessInfo, ...] = ()
    process_util: tuple[ProcessUtilSample, ...] = ()
    gpu_util: float | None = None  # nvidia-smi "utilization.gpu" as a ratio, for comparison only
    error: str | None = None  # why this interval is a gap, or a partial problem
    # Hardware cycle counts over (about) the same interval, when a counter source has them
    # (CUPTI PM sampling, sampler/pm.py): the SM cycles that elapsed, which make the real
    # clock, and the tensor pipes' busy cycles summed over SM sub-partitions. None: not had.
    counter_source: str = COUNTER_SOURCE_NVML
    counter_span_s: float | None = None
    sm_cycles: float | None = None
    tensor_cycles: float | None = None

    @property
    def duration_s(self) -> float:
        return self.t1_s - self.t0_s

    @property
    def real_clock_hz(self) -> float | None:
        """The SMs' clock from their elapsed cycles; None without a cycle counter."""
        if self.sm_cycles is None or not self.counter_span_s:
            return None
        return self.sm_cycles / self.counter_span_s


@dataclass(frozen=True)
class IntervalFlops:
    """FLOPs one unit executed over one interval, by (pipe, precision).

    ``gap_reason`` is set when the interval could not be measured at all; ``flops`` is then
    empty and the interval must be counted as a gap, not as zero work.
    """

    key: str
    t0_s: float
    t1_s: float
    flops: Mapping[tuple[Pipe, str], float] = field(default_factory=dict)
    gap_reason: str | None = None
    unmeasured_pipes: tuple[Pipe, ...] = ()  # pipes the unit cannot report or has no rate for

    @property
    def total(self) -> float:
        return sum(self.flops.values())

    @property
    def duration_s(self) -> float:
        return self.t1_s - self.t0_s


@dataclass(frozen=True)
class Share:
    """FLOPs of one interval, one pipe and precision, given to a pid (None = unattributed)."""

    pid: int | None
    comm: str
    pipe: Pipe
    precision: str
    flops: float


@dataclass(frozen=True)
class AttributedInterval:
    key: str
    t0_s: float
    t1_s: float
    shares: tuple[Share, ...]
    method: str  # "single", "none_seen", "analytic", "sm_util", "no_util_data", "idle"
    # The driver's per-process samples show two or more processes (not MPS clients, which it
    # does not name) running kernels in the interval: their contexts time-sliced the GPU.
    timesliced: bool = False


@dataclass(frozen=True)
class FlopsRow:
    """FLOPs one GPU pipe did for one job (and process) during one interval.

    ``comm`` labels the process series in /metrics; the ledger does not store it.
    """

    gpu: str
    uuid: str
    pipe: str
    precision: str
    job: str
    program: str
    pid: int | None  # None: not attributable to a process
    flops: float
    comm: str = ""

