"""A simulated DCGM host engine behind the fake bindings, driven by a trace recorded on a GPU.

Not part of DCGM's bindings: the fake ``dcgm_agent`` routes every call here. It models what
the sampler relies on: watches are shared per (entity, field) and update at the fastest
watcher's frequency on the engine's own grid (``offset_s`` into each period, unrelated to the
reader's schedule); a profiling value stamped ``ts`` is the mean activity over the window since
the previous update of that field, as DCGM's profiling module aggregates to the update period;
the SM clock (field 100, int64 MHz) is the instantaneous recorded clock. Failures are injected:
profiling unsupported, fields unsupported, a watch refused (profiler held by another tool),
blank values over a time window, the engine dying and restarting.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dcgm_fields
import dcgmvalue

from gpuflops.model import Metric
from gpuflops.sampler.trace import load_trace

ENGINE: FakeHostEngine | None = None

PROF_METRIC = {
    1002: Metric.SM_ACTIVE,
    1003: Metric.SM_OCCUPANCY,
    1004: Metric.TENSOR_ANY,
    1006: Metric.FP64,
    1007: Metric.FP32,
    1008: Metric.FP16,
    1013: Metric.IMMA,
    1014: Metric.HMMA,
    1015: Metric.DFMA,
}
ALL_PROF_FIELDS = frozenset(PROF_METRIC)
ARCH_CODE = {"volta": 5, "turing": 6, "ampere": 7, "ada": 8, "hopper": 9, "blackwell": 10}


def install(engine: FakeHostEngine | None) -> None:
    """Make ``engine`` the one the fake bindings talk to (None: as if libdcgm were absent)."""
    global ENGINE
    ENGINE = engine


@dataclass
class Timeline:
    """Recorded intervals of one unit: (t0, t1, activity or None, clock_hz or None)."""

    rows: list[tuple[float, float, dict[Metric, float] | None, float | None]]

    def __post_init__(self) -> None:
        self._ends = [r[1] for r in self.rows]

    def mean(self, a: float, b: float) -> dict[Metric, float] | None:
        acc: dict[Metric, float] = {}
        total = 0.0
        i = bisect.bisect_left(self._ends, a)
        while i < len(self.rows) and self.rows[i][0] < b:
            t0, t1, act, _ = self.rows[i]
            w = min(b, t1) - max(a, t0)
            if w > 0 and act is not None:
                for m, v in act.items():
                    acc[m] = acc.get(m, 0.0) + v * w
                total += w
            i += 1
        return None if total <= 0 else {m: v / total for m, v in acc.items()}

    def clock_at(self, t: float) -> float | None:
        i = bisect.bisect_left(self._ends, t)
        return self.rows[i][3] if i < len(self.rows) else None


@dataclass
class FakeInstance:
    entity_id: int  # DCGM GPU_I entity id
    instance_id: int  # NVML GPU instance id
    slices: int
    timeline: Timeline


@dataclass
class FakeGpu:
    gpu_id: int
    name: str
    uuid: str
    architecture: str
    timeline: Timeline
    prof_error: int | None = None  # dcgmProfGetSupportedMetricGroups fails with this code
    prof_fields: frozenset[int] = ALL_PROF_FIELDS
    instances: list[FakeInstance] = field(default_factory=list)


@dataclass
class _Row:
    ts_us: int
    status: int
    value: float | int


class FakeHostEngine:
    """One host engine process; ``kill()`` and ``restart()`` model it going away and coming back."""

    def __init__(self, gpus: list[FakeGpu], clock: Callable[[], float], *, offset_s: float = 0.037) -> None:
        import dcgm_structs

        self.st = dcgm_structs
        self.gpus = {g.gpu_id: g for g in gpus}
        self.clock = clock
        self.offset_us = round(offset_s * 1e6)
        self.library_missing = False
        self.alive = True
        self.watch_error: dict[int, int] = {}  # field id -> code dcgmWatchFields returns
        self.blank_windows: list[tuple[float, float]] = []  # profiling values blank in these
        self.calls: dict[str, int] = {}
        self.connections: list[tuple[str, bool]] = []
        self._reset()

    def _reset(self) -> None:
        self._ids = itertools.count(1)
        self.handles: set[int] = set()
        self.groups: dict[int, tuple[int, str, list[tuple[int, int]]]] = {}
        self.field_groups: dict[int, tuple[int, str, list[int]]] = {}
        self.watches: dict[tuple[int, int, int], int] = {}  # (handle, group, fg) -> freq us
        self.cache: dict[tuple[int, int, int], list[_Row]] = {}
        self._last: dict[tuple[int, int, int], int] = {}

    # ---------------------------------------------------------------- lifecycle

    def kill(self) -> None:
        self.alive = False

    def restart(self) -> None:
        self.alive = True
        self._reset()

    def _fail(self, code: int) -> None:
        raise self.st.DCGMError(code)

    def call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def check(self, handle: Any) -> None:
        if not self.alive or int(handle) not in self.handles:
            self._fail(self.st.DCGM_ST_CONNECTION_NOT_VALID)

    def connect(self, address: str, unix: bool) -> int:
        self.call("dcgmConnect_v2")
        self.connections.append((address, unix))
        if not self.alive:
            self._fail(self.st.DCGM_ST_CONNECTION_NOT_VALID)
        h = next(self._ids)
        self.handles.add(h)
        return h

    def start_embedded(self, mode: int) -> int:
        self.call("dcgmStartEmbedded")
        self.connections.append(("embedded", False))
        h = next(self._ids)
        self.handles.add(h)
        return h

    def disconnect(self, handle: Any) -> None:
        self.call("dcgmDisconnect")
        h = int(handle)
        self.check(h)
        self.handles.discard(h)
        # persistAfterDisconnect=0: the engine drops this client's watches and groups.
        for key in [k for k in self.watches if k[0] == h]:
            del self.watches[key]
        for gid in [g for g, v in self.groups.items() if v[0] == h]:
            del self.groups[gid]
        for fid in [f for f, v in self.field_groups.items() if v[0] == h]:
            del self.field_groups[fid]

    # ---------------------------------------------------------------- discovery

    def supported_devices(self, handle: Any) -> list[int]:
        self.check(handle)
        return sorted(self.gpus)

    def device_attributes(self, handle: Any, gpu_id: int) -> Any:
        self.check(handle)
        g = self.gpus[gpu_id]
        attrs = self.st.c_dcgmDeviceAttributes_v3()
        attrs.version = self.st.dcgmDeviceAttributes_version3
        attrs.identifiers.deviceName = g.name.encode()
        attrs.identifiers.uuid = g.uuid.encode()
        attrs.settings.migModeEnabled = 1 if g.instances else 0
        return attrs

    def chip_architecture(self, handle: Any, gpu_id: int) -> int:
        self.check(handle)
        return ARCH_CODE.get(self.gpus[gpu_id].architecture, 0xFFFFFFFF)

    def instance_hierarchy(self, handle: Any) -> Any:
        self.check(handle)
        h = self.st.c_dcgmMigHierarchy_v2()
        h.version = self.st.c_dcgmMigHierarchy_version2
        n = 0
        for g in self.gpus.values():
            for inst in g.instances:
                e = h.entityList[n]
                e.entity.entityGroupId = dcgm_fields.DCGM_FE_GPU_I
                e.entity.entityId = inst.entity_id
                e.parent.entityGroupId = dcgm_fields.DCGM_FE_GPU
                e.parent.entityId = g.gpu_id
                e.info.gpuUuid = g.uuid.encode()
                e.info.nvmlGpuIndex = g.gpu_id
                e.info.nvmlInstanceId = inst.instance_id
                e.info.nvmlProfileSlices = inst.slices
                n += 1
                # A compute instance under it, as DCGM lists them too.
                ci = h.entityList[n]
                ci.entity.entityGroupId = dcgm_fields.DCGM_FE_GPU_CI
                ci.entity.entityId = 100 + inst.entity_id
                ci.parent.entityGroupId = dcgm_fields.DCGM_FE_GPU_I
                ci.parent.entityId = inst.entity_id
                n += 1
        h.count = n
        return h

    def supported_metric_groups(self, handle: Any, gpu_id: int) -> Any:
        self.check(handle)
        g = self.gpus[gpu_id]
        if g.prof_error is not None:
            self._fail(g.prof_error)
        msg = self.st.c_dcgmProfGetMetricGroups_v3()
        msg.version = self.st.dcgmProfGetMetricGroups_version3
        msg.gpuId = gpu_id
        # Spread the fields over metric groups the way DCGM does (major/minor ids).
        groups = [sorted(f for f in g.prof_fields if f < 1005), sorted(f for f in g.prof_fields if f >= 1005)]
        groups = [grp for grp in groups if grp]
        msg.numMetricGroups = len(groups)
        for i, grp in enumerate(groups):
            mg = msg.metricGroups[i]
            mg.majorId, mg.minorId, mg.numFieldIds = 1, i, len(grp)
            for j, f in enumerate(grp):
                mg.fieldIds[j] = f
        return msg

    # ---------------------------------------------------------------- groups and watches

    def group_create(self, handle: Any, name: Any) -> int:
        self.check(handle)
        gid = next(self._ids)
        self.groups[gid] = (int(handle), str(name), [])
        return gid

    def group_destroy(self, handle: Any, gid: int) -> None:
        self.check(handle)
        self.groups.pop(gid, None)

    def group_add(self, handle: Any, gid: int, eg: int, eid: int) -> None:
        self.check(handle)
        self.groups[gid][2].append((eg, eid))

    def field_group_create(self, handle: Any, fields: list[int], name: Any) -> int:
        self.check(handle)
        if any(v[1] == str(name) for v in self.field_groups.values()):
            self._fail(self.st.DCGM_ST_DUPLICATE_KEY)
        fid = next(self._ids)
        self.field_groups[fid] = (int(handle), str(name), fields)
        return fid

    def field_group_destroy(self, handle: Any, fid: int) -> None:
        self.check(handle)
        self.field_groups.pop(fid, None)

    def watch(self, handle: Any, gid: int, fid: int, freq_us: int) -> None:
        self.call("dcgmWatchFields")
        self.check(handle)
        for f in self.field_groups[fid][2]:
            if f in self.watch_error:
                self._fail(self.watch_error[f])
        self._generate()
        self.watches[(int(handle), gid, fid)] = freq_us
        now = self._now_us()
        for key in self._keys():
            self._last.setdefault(key, now)

    def unwatch(self, handle: Any, gid: int, fid: int) -> None:
        self.check(handle)
        self.watches.pop((int(handle), gid, fid), None)

    # ---------------------------------------------------------------- sampling

    def _now_us(self) -> int:
        return round(self.clock() * 1e6)

    def _keys(self) -> dict[tuple[int, int, int], int]:
        """Every watched (entity group, entity, field) with its fastest watcher's period."""
        out: dict[tuple[int, int, int], int] = {}
        for (_h, gid, fid), freq in self.watches.items():
            if gid not in self.groups or fid not in self.field_groups:
                continue
            for eg, eid in self.groups[gid][2]:
                for f in self.field_groups[fid][2]:
                    key = (eg, eid, f)
                    out[key] = min(out.get(key, freq), freq)
        return out

    def _timeline(self, eg: int, eid: int) -> tuple[FakeGpu, Timeline]:
        if eg == dcgm_fields.DCGM_FE_GPU:
            return self.gpus[eid], self.gpus[eid].timeline
        for g in self.gpus.values():
            for inst in g.instances:
                if inst.entity_id == eid:
                    return g, inst.timeline
        raise KeyError((eg, eid))

    def _value(self, eg: int, eid: int, f: int, a_us: int, b_us: int) -> _Row:
        gpu, tl = self._timeline(eg, eid)
        ok = self.st.DCGM_ST_OK
        if f == dcgm_fields.DCGM_FI_DEV_SM_CLOCK:
            hz = tl.clock_at(b_us / 1e6) if eg == dcgm_fields.DCGM_FE_GPU else None
            return _Row(b_us, ok, dcgmvalue.DCGM_INT64_BLANK if hz is None else round(hz / 1e6))
        if f not in gpu.prof_fields or gpu.prof_error is not None:
            return _Row(b_us, ok, dcgmvalue.DCGM_FP64_NOT_SUPPORTED)
        a, b = a_us / 1e6, b_us / 1e6
        if any(w0 < b and a < w1 for w0, w1 in self.blank_windows):
            return _Row(b_us, ok, dcgmvalue.DCGM_FP64_BLANK)
        act = tl.mean(a, b)
        metric = PROF_METRIC[f]
        if act is None or metric not in act:
            return _Row(b_us, ok, dcgmvalue.DCGM_FP64_BLANK)
        return _Row(b_us, ok, act[metric])

    def _generate(self) -> None:
        now = self._now_us()
        for key, freq in self._keys().items():
            last = self._last.setdefault(key, now)
            # Next point of this field's grid: multiples of freq, shifted by the engine's offset.
            k = (last - self.offset_us) // freq + 1
            ts = self.offset_us + k * freq
            rows = self.cache.setdefault(key, [])
            while ts <= now:
                rows.append(self._value(*key, last, ts))
                last = ts
                ts += freq
            self._last[key] = last

    def values_since(self, handle: Any, gid: int, fid: int, since: int, cb: Any) -> int:
        self.call("dcgmGetValuesSince_v2")
        self.check(handle)
        self._generate()
        now = self._now_us()
        import dcgm_structs

        for eg, eid in self.groups[gid][2]:
            for f in self.field_groups[fid][2]:
                for row in self.cache.get((eg, eid, f), []):
                    if not since <= row.ts_us <= now:
                        continue
                    fv = (dcgm_structs.c_dcgmFieldValue_v1 * 1)()
                    v = fv[0]
                    v.version = dcgm_structs.dcgmFieldValue_version1
                    v.fieldId = f
                    ftype = dcgm_fields.field_type(f)
                    v.fieldType = ord(ftype)
                    v.status = row.status
                    v.ts = row.ts_us
                    if ftype == dcgm_fields.DCGM_FT_DOUBLE:
                        v.value.dbl = float(row.value)
                    else:
                        v.value.i64 = int(row.value)
                    cb(eg, eid, fv, 1, None)
        return now + 1


def timeline_from_trace(path: Path, key: str = "0") -> tuple[Timeline, Any]:
    """The recorded intervals of unit ``key`` and the trace header."""
    header, intervals, _ = load_trace(path)
    rows = [
        (s.t0_s, s.t1_s, None if s.activity is None else dict(s.activity), s.clock_hz)
        for iv in intervals
        for s in iv.samples
        if s.key == key
    ]
    return Timeline(rows), header
