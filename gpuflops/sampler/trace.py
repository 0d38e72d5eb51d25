"""The recorded-trace format: versioned JSON Lines, optionally gzip-compressed.

Line 1 is a header::

    {"format": "gpuflops-trace", "version": 1, "recorded_at": "...", "host": {...},
     "interval_s": 0.1, "gpus": [<GpuInfo>, ...]}

Every further line is either an interval::

    {"t0": 1.0, "t1": 1.1, "samples": [<GpuSample>, ...]}

or an annotation that replay ignores (benchmarks use it to carry ground truth)::

    {"event": {"kind": "phase", "name": "bf16 8192^3", "t0": ..., "t1": ..., ...}}

See docs/trace-format.md for every field.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpuflops.model import (
    COUNTER_SOURCE_NVML,
    COUNTER_SOURCE_PM,
    GpuInfo,
    GpuSample,
    Metric,
    ProcessInfo,
    ProcessUtilSample,
)
from gpuflops.sampler.base import Sampler

TRACE_FORMAT = "gpuflops-trace"
TRACE_VERSION = 1
SUPPORTED_TRACE_VERSIONS = (1,)


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and line."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class TraceHeader:
    version: int
    gpus: tuple[GpuInfo, ...]
    interval_s: float | None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TraceInterval:
    t0_s: float
    t1_s: float
    samples: tuple[GpuSample, ...]


@dataclass(frozen=True)
class TraceEvent:
    data: Mapping[str, Any]


# ---------------------------------------------------------------- encoding


def gpu_to_json(g: GpuInfo) -> dict[str, Any]:
    return {
        "key": g.key,
        "index": g.index,
        "uuid": g.uuid,
        "name": g.name,
        "architecture": g.architecture,
        "sm_count": g.sm_count,
        "gpu_instance_id": g.gpu_instance_id,
        "metrics": sorted(m.value for m in g.metrics),
        "unavailable_reason": g.unavailable_reason,
    }


def sample_to_json(s: GpuSample) -> dict[str, Any]:
    d: dict[str, Any] = {
        "key": s.key,
        "t0": s.t0_s,
        "t1": s.t1_s,
        "activity": None
        if s.activity is None
        else {m.value: round(v, 6) for m, v in s.activity.items()},
        "clock_hz": s.clock_hz,
        "clock_reads": s.clock_reads,
    }
    if s.processes:
        d["processes"] = [[p.pid, p.comm, p.used_memory_bytes] for p in s.processes]
    if s.process_util:
        d["process_util"] = [[u.pid, u.timestamp_s, u.sm_util] for u in s.process_util]
    if s.gpu_util is not None:
        d["gpu_util"] = s.gpu_util
    if s.error is not None:
        d["error"] = s.error
    if s.counter_source != COUNTER_SOURCE_NVML:
        d["counters"] = {"source": s.counter_source, "span_s": s.counter_span_s,
                         "sm_cycles": s.sm_cycles, "tensor_cycles": s.tensor_cycles}
    return d


def header_to_json(
    gpus: list[GpuInfo], interval_s: float | None, meta: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "interval_s": interval_s,
        "gpus": [gpu_to_json(g) for g in gpus],
        **dict(meta),
    }


def recording_meta(sampler: Sampler) -> dict[str, Any]:
    """Trace header facts: when, which backend, and what the backend says of the host."""
    meta: dict[str, Any] = {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": sampler.name,
    }
    meta.update(sampler.describe())
    return meta


class TraceWriter:
    """Appends intervals to a trace file; ``.gz`` paths are compressed."""

    def __init__(
        self, path: Path, gpus: list[GpuInfo], interval_s: float | None, meta: Mapping[str, Any]
    ) -> None:
        self.path = path
        raw: IO[bytes] = (
            gzip.open(path, "wb")  # type: ignore[assignment]  # noqa: SIM115 (closed in close())
            if path.suffix == ".gz"
            else open(path, "wb")  # noqa: SIM115
        )
        self._f = io.TextIOWrapper(raw, encoding="utf-8")
        self._write(header_to_json(gpus, interval_s, meta))

    def _write(self, obj: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")

    def interval(self, samples: list[GpuSample]) -> None:
        if not samples:
            return
        t0 = min(s.t0_s for s in samples)
        t1 = max(s.t1_s for s in samples)
        self._write({"t0": t0, "t1": t1, "samples": [sample_to_json(s) for s in samples]})

    def event(self, data: Mapping[str, Any]) -> None:
        self._write({"event": dict(data)})

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- decoding


class _Line:
    """Typed accessors that raise TraceError naming the file and line."""

    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line

    def fail(self, reason: str) -> TraceError:
        return TraceError(self.path, self.line, reason)

    def num(self, obj: Mapping[str, Any], key: str, *, optional: bool = False) -> float | None:
        v = obj.get(key)
        if v is None:
            if optional:
                return None
            raise self.fail(f"field {key!r} is missing")
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(f"field {key!r} must be a finite number, got {v!r}")
        return float(v)

    def req(self, obj: Mapping[str, Any], key: str) -> float:
        v = self.num(obj, key)
        assert v is not None
        return v

    def ratio(self, v: Any, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(f"{what} must be a finite number, got {v!r}")
        if not -1e-6 <= v <= 1 + 1e-6:
            raise self.fail(f"{what} must be a ratio in [0, 1], got {v!r}")
        return min(max(float(v), 0.0), 1.0)


def _gpu_from_json(lc: _Line, d: Any) -> GpuInfo:
    if not isinstance(d, dict):
        raise lc.fail("each entry of 'gpus' must be an object")
    raw_metrics = d.get("metrics", [])
    if not isinstance(raw_metrics, list):
        raise lc.fail(f"gpu {d.get('key')!r}: 'metrics' must be a list")
    try:
        metrics = frozenset(Metric(m) for m in raw_metrics)
    except ValueError as e:
        raise lc.fail(f"unknown metric in gpu {d.get('key')!r}: {e}") from None
    key, uuid, name = d.get("key"), d.get("uuid"), d.get("name")
    if not (isinstance(key, str) and isinstance(uuid, str) and isinstance(name, str)):
        raise lc.fail("gpu entries need string 'key', 'uuid' and 'name'")
    sm = d.get("sm_count")
    if sm is not None and (not isinstance(sm, int) or sm <= 0):
        raise lc.fail(f"gpu {key!r}: sm_count must be a positive integer")
    index = d.get("index", 0)
    if not isinstance(index, int):
        raise lc.fail(f"gpu {key!r}: index must be an integer")
    return GpuInfo(
        key=key,
        index=index,
        uuid=uuid,
        name=name,
        architecture=str(d.get("architecture", "unknown")),
        sm_count=sm,
        gpu_instance_id=d.get("gpu_instance_id"),
        metrics=metrics,
        unavailable_reason=d.get("unavailable_reason"),
    )


def _sample_from_json(lc: _Line, d: Any, keys: set[str]) -> GpuSample:
    if not isinstance(d, dict):
        raise lc.fail("each sample must be an object")
    key = d.get("key")
    if key not in keys:
        raise lc.fail(f"sample for unknown gpu {key!r} (header lists {sorted(keys)})")
    t0, t1 = lc.req(d, "t0"), lc.req(d, "t1")
    if t1 < t0:
        raise lc.fail(f"sample ends before it starts (t0={t0}, t1={t1})")
    raw_act = d.get("activity")
    activity: dict[Metric, float] | None = None
    if raw_act is not None:
        if not isinstance(raw_act, dict):
            raise lc.fail("'activity' must be an object or null")
        activity = {}
        for name, v in raw_act.items():
            try:
                metric = Metric(name)
            except ValueError:
                raise lc.fail(f"unknown activity metric {name!r}") from None
            activity[metric] = lc.ratio(v, f"activity {name!r}")
    raw_procs, raw_utils = d.get("processes", []), d.get("process_util", [])
    if not isinstance(raw_procs, list) or not isinstance(raw_utils, list):
        raise lc.fail("'processes' and 'process_util' must be lists")
    clock_reads, error = d.get("clock_reads") or 0, d.get("error")
    if isinstance(clock_reads, bool) or not isinstance(clock_reads, int) or clock_reads < 0:
        raise lc.fail(f"'clock_reads' must be a non-negative integer, got {clock_reads!r}")
    if error is not None and not isinstance(error, str):
        raise lc.fail(f"'error' must be a string or null, got {error!r}")
    procs = []
    for p in raw_procs:
        if not (isinstance(p, list) and len(p) == 3 and isinstance(p[0], int)):
            raise lc.fail(f"bad process entry {p!r}: want [pid, comm, used_memory_bytes]")
        procs.append(ProcessInfo(p[0], str(p[1]), p[2] if isinstance(p[2], int) else None))
    utils = []
    for u in raw_utils:
        if not (isinstance(u, list) and len(u) == 3 and isinstance(u[0], int)):
            raise lc.fail(f"bad process_util entry {u!r}: want [pid, timestamp_s, sm_util]")
        ts = u[1]
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise lc.fail(f"bad process_util timestamp {ts!r}")
        utils.append(ProcessUtilSample(u[0], float(ts), lc.ratio(u[2], "process sm_util")))
    gpu_util = d.get("gpu_util")
    counters = d.get("counters") or {}
    if not isinstance(counters, dict) or (counters and counters.get("source") != COUNTER_SOURCE_PM):
        raise lc.fail(f"'counters' must be an object with source {COUNTER_SOURCE_PM!r}")
    cycles = {k: lc.num(counters, k, optional=True) for k in ("span_s", "sm_cycles",
                                                               "tensor_cycles")}
    if any(v is not None and v < 0 for v in cycles.values()):
        raise lc.fail(f"negative cycle counts in {counters!r}")
    return GpuSample(
        key=key,
        t0_s=t0,
        t1_s=t1,
        activity=activity,
        clock_hz=lc.num(d, "clock_hz", optional=True),
        clock_reads=clock_reads,
        processes=tuple(procs),
        process_util=tuple(utils),
        gpu_util=None if gpu_util is None else lc.ratio(gpu_util, "gpu_util"),
        error=error,
        counter_source=COUNTER_SOURCE_PM if counters else COUNTER_SOURCE_NVML,
        counter_span_s=cycles["span_s"],
        sm_cycles=cycles["sm_cycles"],
        tensor_cycles=cycles["tensor_cycles"],
    )


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_trace(path: Path) -> tuple[TraceHeader, Iterator[TraceInterval | TraceEvent]]:
    """Read the header now; yield intervals and events lazily. Raises TraceError."""
    name = str(path)
    try:
        f = _open_text(path)
    except OSError as e:
        raise TraceError(name, 1, f"cannot read trace: {e}") from None
    try:
        try:
            first = f.readline()
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
            raise TraceError(name, 1, f"cannot read trace: {e}") from None
        header = _parse_header(name, first)
    except TraceError:
        f.close()  # the records generator, which would close it, is never made
        raise
    keys = {g.key for g in header.gpus}
    return header, _records(name, f, keys)


def _parse_header(name: str, line: str) -> TraceHeader:
    lc = _Line(name, 1)
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise lc.fail(f"header is not JSON: {e.msg}") from None
    if not isinstance(d, dict) or d.get("format") != TRACE_FORMAT:
        raise lc.fail(f"not a gpuflops trace (header 'format' must be {TRACE_FORMAT!r})")
    version = d.get("version")
    if version not in SUPPORTED_TRACE_VERSIONS:
        raise lc.fail(f"unsupported trace version {version!r}; supported: {SUPPORTED_TRACE_VERSIONS}")
    gpus = d.get("gpus")
    if not isinstance(gpus, list) or not gpus:
        raise lc.fail("header must list at least one gpu")
    infos = tuple(_gpu_from_json(lc, g) for g in gpus)
    if len({g.key for g in infos}) != len(infos):
        raise lc.fail("gpu keys in header must be unique")
    meta = {k: v for k, v in d.items() if k not in ("format", "version", "gpus", "interval_s")}
    return TraceHeader(version, infos, lc.num(d, "interval_s", optional=True), meta)


def _records(name: str, f: IO[str], keys: set[str]) -> Iterator[TraceInterval | TraceEvent]:
    lineno = 1
    with f:
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
                # zlib.error: corrupt compressed data (truncation raises EOFError instead).
                raise TraceError(name, lineno + 1, f"cannot read: {e}") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            yield parse_record(name, lineno, line, keys)


def parse_record(name: str, lineno: int, line: str, keys: set[str]) -> TraceInterval | TraceEvent:
    lc = _Line(name, lineno)
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise lc.fail(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise lc.fail("each line must be a JSON object")
    if "event" in d:
        if not isinstance(d["event"], dict):
            raise lc.fail("'event' must be an object")
        return TraceEvent(d["event"])
    samples = d.get("samples")
    if not isinstance(samples, list):
        raise lc.fail("interval line needs a 'samples' list")
    t0, t1 = lc.req(d, "t0"), lc.req(d, "t1")
    if t1 < t0:
        raise lc.fail(f"interval ends before it starts (t0={t0}, t1={t1})")
    return TraceInterval(t0, t1, tuple(_sample_from_json(lc, s, keys) for s in samples))


def load_trace(path: Path) -> tuple[TraceHeader, list[TraceInterval], list[TraceEvent]]:
    """Read a whole trace into memory (tests, benchmarks, validation)."""
    header, records = read_trace(path)
    intervals: list[TraceInterval] = []
    events: list[TraceEvent] = []
    for r in records:
        (events if isinstance(r, TraceEvent) else intervals).append(r)  # type: ignore[arg-type]
    return header, intervals, events
