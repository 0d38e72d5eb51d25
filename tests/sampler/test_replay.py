"""ReplaySampler: recorded intervals moved onto the clock, looping, speed, bad traces."""

from __future__ import annotations

import gzip
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from gpuflops.sampler.base import Sampler, SamplerError
from gpuflops.sampler.replay import ReplaySampler
from gpuflops.sampler.trace import TraceWriter, load_trace
from tests.support import DEMO_TRACE, ROOT, FakeClock, demo_trace

DEMO = DEMO_TRACE
SCENARIOS = ROOT / "tests" / "data" / "h100-attribution-scenarios.jsonl.gz"


class AdvancingStop(threading.Event):
    """A stop Event that advances the fake clock instead of blocking, so replay runs instantly."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.clock.sleep(timeout)
        return self.is_set()


def _head(tmp_path: Path, n_lines: int, src: Path = DEMO) -> Path:
    """The header and the first ``n_lines`` records of a real trace."""
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_lines + 1)]
    out = tmp_path / "head.jsonl"
    out.write_text("".join(lines))
    return out


def _sampler(path: Path, start: float = 5000.0, **kw: object) -> tuple[ReplaySampler, FakeClock]:
    clock = FakeClock(start)
    return ReplaySampler(path, clock=clock, stop=AdvancingStop(clock), **kw), clock  # type: ignore[arg-type]


def test_is_a_sampler_and_reports_header_gpus() -> None:
    s, _ = _sampler(DEMO)
    assert isinstance(s, Sampler)
    assert [g.key for g in s.gpus()] == ["0"]
    assert s.gpus()[0].sm_count == 132
    assert s.interval_s == 0.1


def test_timestamps_shifted_onto_clock_and_durations_kept() -> None:
    _h, intervals, _ = demo_trace()
    s, clock = _sampler(DEMO, start=5000.0)
    got = [s.sample() for _ in range(50)]
    origin = intervals[0].t0_s
    assert got[0][0].t0_s == pytest.approx(5000.0, abs=1e-6)
    for rec, out in zip(intervals[:50], got, strict=True):
        (orig,) = rec.samples
        (new,) = out
        assert new.t0_s - 5000.0 == pytest.approx(orig.t0_s - origin, abs=1e-6)
        assert new.duration_s == pytest.approx(orig.duration_s, abs=1e-6)
        assert new.activity == orig.activity and new.clock_hz == orig.clock_hz
    # At speed 1 each sample is released when its interval has ended on the clock.
    assert clock.t == pytest.approx(got[-1][0].t1_s, abs=1e-6)


def test_process_util_timestamps_move_with_the_samples() -> None:
    _h, intervals, _ = load_trace(SCENARIOS)
    s, _clock = _sampler(SCENARIOS, start=100.0, speed=1e6)
    shift = 100.0 - intervals[0].t0_s
    checked = 0
    for rec in intervals:
        (new,) = s.sample()
        (orig,) = rec.samples
        assert [(u.pid, u.sm_util) for u in new.process_util] == [
            (u.pid, u.sm_util) for u in orig.process_util
        ]
        for a, b in zip(new.process_util, orig.process_util, strict=True):
            assert a.timestamp_s == pytest.approx(b.timestamp_s + shift, abs=1e-6)
            checked += 1
    assert checked > 50


def test_ends_without_loop(tmp_path: Path) -> None:
    path = _head(tmp_path, 40)
    _h, intervals, events = load_trace(path)
    s, _ = _sampler(path, speed=1e6)
    n = 0
    with pytest.raises(StopIteration):
        while True:
            s.sample()
            n += 1
    assert n == len(intervals) == 40 - len(events)


def test_loop_advances_by_the_trace_span(tmp_path: Path) -> None:
    path = _head(tmp_path, 30)
    _h, intervals, _ = load_trace(path)
    span = intervals[-1].t1_s - intervals[0].t0_s
    n = len(intervals)
    s, _ = _sampler(path, start=0.0, loop=True)
    first = [s.sample()[0] for _ in range(n)]
    second = [s.sample()[0] for _ in range(n)]
    third = s.sample()[0]
    for a, b in zip(first, second, strict=True):
        assert b.t0_s - a.t0_s == pytest.approx(span, abs=1e-6)
        assert b.duration_s == pytest.approx(a.duration_s, abs=1e-9)
        assert b.activity == a.activity
    # Loops join without a hole or an overlap, and time never runs backwards.
    assert second[0].t0_s == pytest.approx(first[-1].t1_s, abs=1e-6)
    assert third.t0_s == pytest.approx(first[0].t0_s + 2 * span, abs=1e-6)
    ends = [x.t1_s for x in (*first, *second)]
    assert ends == sorted(ends)


def test_speed_emits_faster_with_unchanged_durations(tmp_path: Path) -> None:
    path = _head(tmp_path, 60)
    s1, c1 = _sampler(path, start=0.0)
    s4, c4 = _sampler(path, start=0.0, speed=4.0)
    a = [s1.sample()[0] for _ in range(40)]
    b = [s4.sample()[0] for _ in range(40)]
    elapsed_trace = a[-1].t1_s - a[0].t0_s
    assert c1.t == pytest.approx(elapsed_trace, abs=1e-6)
    assert c4.t == pytest.approx(elapsed_trace / 4, abs=1e-6)
    assert [x.duration_s for x in b] == pytest.approx([x.duration_s for x in a], abs=1e-9)
    assert [x.t0_s for x in b] == pytest.approx([x.t0_s for x in a], abs=1e-9)


def test_real_stop_event_is_used_for_waiting(tmp_path: Path) -> None:
    path = _head(tmp_path, 30)
    stop = threading.Event()
    s = ReplaySampler(path, stop=stop)
    s.sample()
    s.close()  # sets the stop event: later waits return at once
    assert stop.is_set()
    s.sample()  # does not block for the interval


def test_corrupt_trace_is_a_sampler_error_naming_file_and_line(tmp_path: Path) -> None:
    path = _head(tmp_path, 30)
    lines = path.read_text().splitlines()
    lines[17] = lines[17].replace('"t1":', '"t1":"late","x":', 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SamplerError, match=rf"{path}:18: .*'t1' must be a finite number"):
        ReplaySampler(path)


def test_bad_arguments_and_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(SamplerError, match="speed must be positive"):
        ReplaySampler(DEMO, speed=0)
    header_only = _head(tmp_path, 0)
    with pytest.raises(SamplerError, match="has no intervals"):
        ReplaySampler(header_only)
    with pytest.raises(SamplerError, match=r"missing\.jsonl:1: cannot read trace"):
        ReplaySampler(tmp_path / "missing.jsonl")


def test_replay_counts_the_backend_errors_the_recording_saw(tmp_path: Path) -> None:
    header, intervals, _ = demo_trace()
    w = TraceWriter(tmp_path / "t.jsonl", list(header.gpus), header.interval_s, {})
    for i, iv in enumerate(intervals[:30]):
        samples = list(iv.samples)
        if 10 <= i < 13:
            samples = [replace(s, activity=None, error="timeout") for s in samples]
        if i == 13:
            samples = [replace(s, activity=None, error="resync") for s in samples]
        w.interval(samples)
    w.close()
    r = ReplaySampler(tmp_path / "t.jsonl", speed=1e6)
    for _ in range(30):
        r.sample()
    assert r.errors == {("0", "timeout"): 3}  # resync is a gap, not a failed call
