"""Turns activity samples into FLOPs per pipe.

FLOPs over an interval = activity x SMs x FLOPs/clock/SM(family, precision) x SM cycles.

The SM cycles are the hardware's own count when a counter source has it (CUPTI PM sampling's
``sm__cycles_elapsed``): NVML's reported clock runs 4-14% ahead of the SMs' real one under load
on an H200 (docs/accuracy.md). Without it they are NVML's mean clock over the same interval the
activity covers (the sampler reads the clock several times within each interval): the clock
swings 1.0-1.98 GHz within a second under the power cap and throttling comes with high
activity, so averaging the two over long windows separately biases the product.

Tensor pipes, where the family's tensor-cycle rate is measured (Hopper): FLOPs = the tensor
pipes' busy cycles x rate / ``tensor_cycle_divisor``, split among HMMA, IMMA and DFMA in the
proportion of their GPM activity. That product needs no clock at all, and counts every busy
cycle at the full-rate path's worth; kernels on the half-rate ``mma.sync`` path read 2x (a
job's kernel census corrects that, in compliance/reconcile.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gpuflops.model import PIPE_METRIC, GpuInfo, GpuSample, IntervalFlops, Pipe
from gpuflops.rates import (
    DEFAULT_HMMA_PRECISION,
    MAX_SM_CLOCK_HZ,
    Family,
    family_for,
    pipe_precision,
    rate_for,
)

TENSOR_PIPES = (Pipe.HMMA, Pipe.IMMA, Pipe.DFMA)

PrecisionFor = Callable[[str], str]


class Integrator:
    """Stateless per interval; the HMMA precision comes from a callable (config or job)."""

    def __init__(self, precision_for: PrecisionFor | None = None) -> None:
        self._precision_for = precision_for or (lambda _key: DEFAULT_HMMA_PRECISION)
        self._families: dict[str, Family | None] = {}

    def family(self, info: GpuInfo) -> Family | None:
        if info.key not in self._families:
            self._families[info.key] = family_for(info.architecture, info.name)
        return self._families[info.key]

    def hmma_precision(self, key: str) -> str:
        return self._precision_for(key)

    def integrate(
        self, info: GpuInfo, sample: GpuSample, hmma_precision: str | None = None
    ) -> IntervalFlops:
        """FLOPs of one interval; ``hmma_precision`` overrides the configured one (a job's)."""
        if sample.activity is None:
            return self._gap(sample, sample.error or "no_activity")
        if sample.clock_hz is None:
            return self._gap(sample, "no_clock")
        implausible = _implausible(info, sample)
        if implausible is not None:
            return self._gap(sample, implausible)
        family = self.family(info)
        if family is None:
            return self._gap(sample, "unknown_architecture")
        if info.sm_count is None:
            return self._gap(sample, "unknown_sm_count")
        dt = sample.duration_s
        if dt <= 0:
            return self._gap(sample, "empty_interval")
        real = sample.real_clock_hz
        cycles = (real if real is not None else sample.clock_hz) * dt
        hmma_precision = hmma_precision or self._precision_for(info.key)
        flops: dict[tuple[Pipe, str], float] = {}
        unmeasured: list[Pipe] = []
        tensor_share = self._tensor_shares(family, sample)
        for pipe, metric in PIPE_METRIC.items():
            activity = sample.activity.get(metric)
            precision = pipe_precision(pipe, hmma_precision)
            rate = rate_for(family, pipe, precision)
            if activity is None or rate is None:
                # No rate for an idle pipe costs nothing; for a busy one it is unmeasured work.
                if activity is None or activity > 0:
                    unmeasured.append(pipe)
                continue
            if tensor_share is not None and pipe in tensor_share:
                assert family.tensor_cycle_divisor is not None
                flops[(pipe, precision)] = (tensor_share[pipe] * rate.flops_per_clock_per_sm
                                            / family.tensor_cycle_divisor)
                continue
            flops[(pipe, precision)] = (
                activity * info.sm_count * rate.flops_per_clock_per_sm * cycles
            )
        return IntervalFlops(
            sample.key, sample.t0_s, sample.t1_s, flops, None, tuple(unmeasured)
        )

    @staticmethod
    def _tensor_shares(family: Family, sample: GpuSample) -> dict[Pipe, float] | None:
        """The interval's tensor-pipe busy cycles per tensor pipe, or None to use activity."""
        if family.tensor_cycle_divisor is None or sample.tensor_cycles is None:
            return None
        assert sample.activity is not None
        weights = {p: sample.activity.get(PIPE_METRIC[p]) or 0.0 for p in TENSOR_PIPES}
        total = sum(weights.values())
        if total <= 0:
            # Busy cycles too few for GPM's percent resolution: HMMA is by far the likeliest.
            weights, total = {Pipe.HMMA: 1.0}, 1.0
        return {p: sample.tensor_cycles * w / total for p, w in weights.items()}

    @staticmethod
    def _gap(sample: GpuSample, reason: str) -> IntervalFlops:
        return IntervalFlops(sample.key, sample.t0_s, sample.t1_s, {}, reason, ())


# No sampling interval is longer than this: a longer one is a clock jump or a bad trace.
_MAX_INTERVAL_S = 3600.0
# Busy tensor cycles are summed over an SM's sub-partitions (four on every family in the table).
_TENSOR_SUBPARTITIONS = 4


def _implausible(info: GpuInfo, sample: GpuSample) -> str | None:
    """Why a sample cannot be a measurement (a physical bound it breaks), or None.

    Every backend and every replayed trace passes here, so a clock of 1e300 Hz or an activity
    above 1 becomes a gap, counted and recorded, never FLOPs."""
    times = (sample.t0_s, sample.t1_s)
    if not all(math.isfinite(t) for t in times) or not 0 <= sample.duration_s <= _MAX_INTERVAL_S:
        return "implausible_interval"
    clock = sample.clock_hz
    if clock is None or not 0 <= clock <= MAX_SM_CLOCK_HZ:
        return "implausible_clock"
    real = sample.real_clock_hz
    if real is not None and not 0 <= real <= MAX_SM_CLOCK_HZ:
        return "implausible_clock"
    assert sample.activity is not None
    if any(not 0.0 <= v <= 1.0 for v in sample.activity.values()):  # also NaN
        return "implausible_activity"
    if sample.tensor_cycles is not None:
        span = sample.counter_span_s or sample.duration_s
        most = (info.sm_count or 0) * _TENSOR_SUBPARTITIONS * MAX_SM_CLOCK_HZ * span * 1.5
        if not 0 <= sample.tensor_cycles <= most:
            return "implausible_tensor_cycles"
    return None
