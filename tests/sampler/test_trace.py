"""Trace format: round trips, and a TraceError naming file and line for every malformed line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuflops.model import COUNTER_SOURCE_PM
from gpuflops.sampler.trace import (
    TraceError,
    TraceEvent,
    TraceInterval,
    TraceWriter,
    load_trace,
    read_trace,
)
from tests.support import DEMO_TRACE, ROOT

DEMO = DEMO_TRACE
SCENARIOS = ROOT / "tests" / "data" / "h100-attribution-scenarios.jsonl.gz"


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _first_interval_line(lines: list[str]) -> int:
    """0-based index of the first interval line that carries processes and process_util."""
    for i, line in enumerate(lines[1:], start=1):
        d = json.loads(line)
        if "samples" in d and d["samples"][0].get("process_util"):
            return i
    raise AssertionError("no interval with process_util in the trace")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_round_trip_preserves_every_interval_and_event(tmp_path: Path, suffix: str) -> None:
    header, intervals, events = load_trace(SCENARIOS)
    out = tmp_path / f"copy{suffix}"
    w = TraceWriter(out, list(header.gpus), header.interval_s, header.meta)
    for iv in intervals:
        w.interval(list(iv.samples))
    for ev in events:
        w.event(ev.data)
    w.close()
    if suffix == ".jsonl.gz":
        assert out.read_bytes()[:2] == b"\x1f\x8b"
    else:
        assert out.read_text().startswith('{"format":"gpuflops-trace"')

    h2, iv2, ev2 = load_trace(out)
    assert h2.gpus == header.gpus
    assert h2.interval_s == 0.1
    assert h2.meta["driver_version"] == "580.159.04"
    assert len(iv2) == len(intervals) == 1464
    assert [s for iv in iv2 for s in iv.samples] == [s for iv in intervals for s in iv.samples]
    assert [e.data for e in ev2] == [e.data for e in events]
    # The round trip kept the per-process data the attribution tests rely on.
    assert sum(len(s.process_util) for iv in iv2 for s in iv.samples) > 0


def test_events_are_returned_separately_from_intervals() -> None:
    _header, intervals, events = load_trace(DEMO)
    assert len(intervals) == 1267
    assert all(isinstance(e, TraceEvent) for e in events)
    kinds = [e.data["kind"] for e in events]
    assert kinds.count("phase") == 11 and kinds.count("idle") == 1
    assert sum(1 for e in events if e.data.get("shared")) == 2
    # read_trace yields both kinds lazily, in file order.
    _h, records = read_trace(DEMO)
    recs = list(records)
    assert sum(isinstance(r, TraceInterval) for r in recs) == 1267
    assert sum(isinstance(r, TraceEvent) for r in recs) == 12


def _corrupt(tmp_path: Path, edit: Callable[[list[str]], int], name: str = "bad.jsonl") -> tuple[Path, int]:
    """A copy of the scenarios trace with one line changed by ``edit``; returns (path, 1-based line)."""
    lines = _lines(SCENARIOS)[:200]
    idx = edit(lines)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path, idx + 1


def _edit_sample(mutate: Callable[[dict[str, Any]], None]) -> Callable[[list[str]], int]:
    def edit(lines: list[str]) -> int:
        i = _first_interval_line(lines)
        d = json.loads(lines[i])
        mutate(d["samples"][0])
        lines[i] = json.dumps(d)
        return i

    return edit


def _edit_header(mutate: Callable[[dict[str, Any]], None]) -> Callable[[list[str]], int]:
    def edit(lines: list[str]) -> int:
        d = json.loads(lines[0])
        mutate(d)
        lines[0] = json.dumps(d)
        return 0

    return edit


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def _raw(text: str) -> Callable[[list[str]], int]:
    def edit(lines: list[str]) -> int:
        i = _first_interval_line(lines)
        lines[i] = text
        return i

    return edit


def _activity(metric: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda s: s["activity"].__setitem__(metric, value)


MALFORMED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "not_json": (_raw('{"t0": 1, "t1": 2, "samples": ['), "not JSON"),
    "not_an_object": (_raw("[1, 2, 3]"), "must be a JSON object"),
    "no_samples": (_raw('{"t0": 1.0, "t1": 1.1}'), "'samples' list"),
    "event_not_object": (_raw('{"event": 5}'), "'event' must be an object"),
    "t0_string": (_edit_sample(_set("t0", "soon")), "finite number"),
    "t1_missing": (_edit_sample(lambda s: s.pop("t1")), "'t1' is missing"),
    "t0_bool": (_edit_sample(_set("t0", True)), "finite number"),
    "clock_string": (_edit_sample(_set("clock_hz", "fast")), "clock_hz"),
    "clock_reads_string": (_edit_sample(_set("clock_reads", "five")), "clock_reads"),
    "error_not_string": (_edit_sample(_set("error", 42)), "error"),
    "activity_list": (_edit_sample(_set("activity", [0.5])), "'activity' must be an object"),
    "ratio_above_one": (_edit_sample(_activity("hmma", 1.5)), "ratio in [0, 1]"),
    "ratio_negative": (_edit_sample(_activity("fp32", -0.2)), "ratio in [0, 1]"),
    "ratio_string": (_edit_sample(_activity("hmma", "high")), "finite number"),
    "unknown_metric": (_edit_sample(_activity("bogus_pipe", 0.1)), "unknown activity metric"),
    "unknown_gpu_key": (_edit_sample(_set("key", "7")), "unknown gpu '7'"),
    "t1_before_t0": (_edit_sample(lambda s: s.__setitem__("t1", s["t0"] - 1)), "ends before it starts"),
    "processes_not_list": (_edit_sample(_set("processes", 5)), "processes"),
    "process_entry_bad": (_edit_sample(_set("processes", [["458", "python3", 0]])), "bad process entry"),
    "process_util_not_list": (_edit_sample(_set("process_util", {"a": 1})), "process_util"),
    "process_util_ratio": (
        _edit_sample(lambda s: s.__setitem__("process_util", [[1, 2.0, 3.0]])),
        "ratio in [0, 1]",
    ),
    "gpu_util_out_of_range": (_edit_sample(_set("gpu_util", 2.0)), "ratio in [0, 1]"),
    "sample_not_object": (_raw('{"t0": 1.0, "t1": 1.1, "samples": [5]}'), "each sample must be an object"),
    "interval_t1_before_t0": (
        _raw('{"t0": 5.0, "t1": 4.0, "samples": []}'),
        "interval ends before it starts",
    ),
    "header_not_json": (lambda lines: lines.__setitem__(0, "{oops") or 0, "header is not JSON"),
    "header_wrong_format": (_edit_header(_set("format", "csv")), "not a gpuflops trace"),
    "header_version_2": (_edit_header(_set("version", 2)), "unsupported trace version 2"),
    "header_version_missing": (_edit_header(lambda d: d.pop("version")), "unsupported trace version None"),
    "header_no_gpus": (_edit_header(_set("gpus", [])), "at least one gpu"),
    "header_gpu_unknown_metric": (
        _edit_header(lambda d: d["gpus"][0].__setitem__("metrics", ["hmma", "warp9"])),
        "unknown metric",
    ),
    "header_gpu_metrics_not_list": (
        _edit_header(lambda d: d["gpus"][0].__setitem__("metrics", 7)),
        "metrics",
    ),
    "header_gpu_sm_count": (_edit_header(lambda d: d["gpus"][0].__setitem__("sm_count", -1)), "sm_count"),
    "header_gpu_no_uuid": (_edit_header(lambda d: d["gpus"][0].pop("uuid")), "string 'key', 'uuid'"),
    "header_duplicate_keys": (_edit_header(lambda d: d["gpus"].append(d["gpus"][0])), "unique"),
    "header_interval_string": (_edit_header(_set("interval_s", "0.1s")), "interval_s"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_line_names_file_and_line(tmp_path: Path, case: str) -> None:
    edit, reason = MALFORMED[case]
    path, line = _corrupt(tmp_path, edit)
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    e = ei.value
    assert e.path == str(path)
    assert e.line == line
    assert str(e).startswith(f"{path}:{line}: ")
    assert reason in e.reason


def test_line_numbers_count_events_and_blank_lines(tmp_path: Path) -> None:
    lines = _lines(DEMO)[:40]
    lines.insert(5, "")  # blank lines are skipped but still counted
    lines.insert(6, '{"event": {"kind": "note"}}')
    lines[30] = lines[30].replace('"activity":{', '"activity":{"nope":0.1,', 1)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    assert ei.value.line == 31
    assert "unknown activity metric 'nope'" in str(ei.value)


def test_truncated_gzip_is_a_trace_error(tmp_path: Path) -> None:
    data = DEMO.read_bytes()
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    assert ei.value.path == str(path)
    assert ei.value.line > 1  # the header was read; the failure is further in


def test_corrupt_gzip_stream_is_a_trace_error(tmp_path: Path) -> None:
    data = bytearray(DEMO.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # zeroed compressed bytes: zlib reports invalid data
    path = tmp_path / "zeroed.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    assert ei.value.path == str(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as ei:
        load_trace(tmp_path / "absent.jsonl")
    assert ei.value.line == 1 and "cannot read trace" in ei.value.reason
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TraceError, match=r"empty\.jsonl:1: header is not JSON"):
        load_trace(empty)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceError, match=r"bin\.jsonl:1: "):
        load_trace(binary)



def test_pm_cycle_counts_round_trip(tmp_path: Path) -> None:
    header, intervals, _events = load_trace(SCENARIOS)
    first = intervals[0].samples[0]
    counted = replace(first, counter_source=COUNTER_SOURCE_PM, counter_span_s=0.09,
                      sm_cycles=1.2e8, tensor_cycles=3.4e10)
    out = tmp_path / "pm.jsonl"
    w = TraceWriter(out, list(header.gpus), header.interval_s, header.meta)
    w.interval([counted, *intervals[0].samples[1:]])
    w.close()
    _h, back, _e = load_trace(out)
    assert back[0].samples[0] == counted
    assert back[0].samples[0].real_clock_hz == pytest.approx(1.2e8 / 0.09)
    text = out.read_text().replace('"cupti_pm"', '"made_up"')
    out.write_text(text)
    with pytest.raises(TraceError, match="counters"):
        load_trace(out)
