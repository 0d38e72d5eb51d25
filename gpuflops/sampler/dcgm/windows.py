"""How DCGM's update windows become gpuflops intervals.

DCGM samples the profiling fields on its own schedule (the fastest period any client asked for,
never below the profiling module's minimum) and stores each value with the timestamp ``ts`` of
the update; the value is the ratio averaged over the window since the previous update,
``(ts_prev, ts]``. Each interval runs from the end of the last consumed window to the newest
timestamp: consecutive windows tile time exactly, whatever DCGM's phase relative to ours. The
SM clock (watched faster, in a second field group) is averaged inside each window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpuflops.model import GpuInfo, GpuSample, Metric

CountError = Callable[["Unit", str, str], None]  # (unit, kind, message): a counted failure


@dataclass
class Unit:
    """One measured unit and the DCGM windows read for it but not yet reported."""

    info: GpuInfo
    entity_group: int
    entity_id: int
    gpu_id: int  # DCGM id of the physical GPU (clock source)
    fields: dict[int, Metric]  # profiling fields this unit reports
    acct_s: float = 0.0  # end of the time already reported: t0 of the next sample
    synced: bool = False  # acct_s is the timestamp of a consumed DCGM window's end
    rows: dict[int, dict[int, float | None]] = field(default_factory=dict)  # ts_us -> values


def clock_mean(rows: list[tuple[int, float]], a_us: int, b_us: int) -> tuple[float | None, int]:
    """Mean SM clock of the reads in (a_us, b_us], and how many; else the last read within 1 s."""
    inside = [hz for ts, hz in rows if a_us < ts <= b_us]
    if inside:
        return sum(inside) / len(inside), len(inside)
    before = [(ts, hz) for ts, hz in rows if ts <= b_us and b_us - ts <= 1e6]
    if before:
        return max(before)[1], 1
    return None, 0


def gap(u: Unit, t1: float, error: str, clock_hz: float | None = None) -> GpuSample:
    """An unmeasured interval from the unit's reported time up to ``t1``."""
    t0 = u.acct_s
    u.acct_s = max(t0, t1)
    return GpuSample(u.info.key, t0, u.acct_s, None, clock_hz, error=error)


def measure(
    u: Unit, ready: list[int], clock_rows: list[tuple[int, float]], count: CountError
) -> GpuSample:
    """One interval from the consumed windows ``ready`` (their end timestamps, in µs).

    The activity is the clock-weighted mean of the windows' ratios, so activity x mean clock x
    duration equals the sum over windows of activity x clock x window length.
    """
    t0 = u.acct_s
    prev = round(t0 * 1e6)
    weighted: dict[Metric, float] = {}
    blank: set[Metric] = set()
    cycles = 0.0
    span = 0.0
    reads = 0
    for ts in ready:
        row = u.rows.pop(ts)
        dt = (ts - prev) / 1e6
        hz, n = clock_mean(clock_rows, prev, ts)
        prev = ts
        if hz is None:
            u.acct_s = ts / 1e6
            u.rows = {}
            count(u, "no_clock", "no SM clock value from DCGM for this window")
            return GpuSample(u.info.key, t0, ts / 1e6, None, None, error="no_clock")
        reads += n
        cycles += hz * dt
        span += dt
        for f, metric in u.fields.items():
            v = row.get(f)
            if v is None:
                blank.add(metric)
            else:
                weighted[metric] = weighted.get(metric, 0.0) + min(max(v, 0.0), 1.0) * hz * dt
    t1 = ready[-1] / 1e6
    u.acct_s = t1
    clock_hz = cycles / span if span > 0 else None
    activity = {m: (v / cycles if cycles > 0 else 0.0) for m, v in weighted.items() if m not in blank}
    if not activity:
        count(u, "blank", "DCGM returned blank profiling values (profiler busy or paused?)")
        return GpuSample(u.info.key, t0, t1, None, clock_hz, reads, error="blank")
    error = None
    if blank:
        error = "partial_blank"
        count(u, error, f"DCGM returned blank values for {sorted(m.value for m in blank)}")
    return GpuSample(u.info.key, t0, t1, activity, clock_hz, reads, error=error)
