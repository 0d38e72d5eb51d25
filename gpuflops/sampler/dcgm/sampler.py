"""DCGM backend: profiling fields (SM/tensor/pipe activity) and the SM clock from a host engine.

The only module that imports DCGM's Python bindings (``dcgm_structs``, ``dcgm_agent``,
``dcgm_fields``, ``dcgmvalue``, shipped with DCGM, not on PyPI). They are looked up in
configurable directories and put on ``sys.path`` when a sampler is constructed, never at import
time. Every call goes through :func:`dcgm_query`, which maps ``DCGMError`` to
:class:`DcgmCallError` with a stable ``kind``. Units are converted here: MHz -> Hz, DCGM's
microsecond timestamps -> seconds.

How a DCGM interval maps onto [t0, t1]: DCGM samples the profiling fields on its own schedule
(the fastest period any client asked for, never below the profiling module's minimum) and
stores each value with the timestamp ``ts`` of the update; the value is the ratio averaged over
the window since the previous update, ``(ts_prev, ts]``. Each :meth:`DcgmSampler.sample`
reads every value since the last read (``dcgmGetValuesSince_v2``) and emits one interval per
unit from the end of the last consumed window to the newest timestamp: consecutive windows tile
time exactly, whatever DCGM's phase relative to ours. The SM clock (field 100) is watched
faster in a second field group and averaged inside each window; the interval's activity is the
clock-weighted mean of its windows, so activity x mean clock x duration equals the sum over
windows of activity x clock x window length.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gpuflops.model import GpuInfo, GpuSample, Metric
from gpuflops.rates import ARCHITECTURE_CODES
from gpuflops.sampler.base import SamplerError

log = logging.getLogger(__name__)

# DCGM profiling field ids (dcgm_fields.h, DCGM_FI_PROF_*); values are ratios in [0, 1].
PROF_FIELD_IDS: dict[Metric, int] = {
    Metric.SM_ACTIVE: 1002,
    Metric.SM_OCCUPANCY: 1003,
    Metric.TENSOR_ANY: 1004,
    Metric.FP64: 1006,
    Metric.FP32: 1007,
    Metric.FP16: 1008,
    Metric.IMMA: 1013,
    Metric.HMMA: 1014,
    Metric.DFMA: 1015,
}
_FIELD_METRIC = {v: k for k, v in PROF_FIELD_IDS.items()}
SM_CLOCK_FIELD = 100  # DCGM_FI_DEV_SM_CLOCK, int64 MHz

DEFAULT_BINDINGS_PATHS: tuple[Path, ...] = (
    Path("/usr/share/datacenter-gpu-manager-4/bindings/python3"),  # DCGM 4 packages
    Path("/usr/local/dcgm/bindings/python3"),  # DCGM 3 packages
)
DEFAULT_ENDPOINT = "localhost:5555"

_FE_GPU = 1  # DCGM_FE_GPU
_FE_GPU_I = 4  # DCGM_FE_GPU_I

# Datasheet SM counts by marketing name, for whole GPUs when the daemon supplies none (DCGM has
# no SM-count field). First match wins, so longer names come first.
_DATASHEET_SMS: tuple[tuple[str, int], ...] = (
    ("H100 PCIe", 114),
    ("H100", 132),
    ("H200", 132),
    ("GH200", 132),
    ("B200", 148),
    ("A100", 108),
    ("A30", 56),
    ("L40S", 142),
    ("L40", 142),
    ("L4", 58),
    ("A10", 72),
    ("V100", 80),
    ("T4", 40),
)

# DCGM return codes by name -> the stable kind gpuflops reports (sampler_errors_total{kind}).
_KIND_NAMES = {
    "DCGM_ST_CONNECTION_NOT_VALID": "connection_lost",
    "DCGM_ST_IN_USE": "profiler_in_use",
    "DCGM_ST_PROFILING_MULTI_PASS": "profiling_multi_pass",
    "DCGM_ST_PROFILING_NOT_SUPPORTED": "profiling_not_supported",
    "DCGM_ST_PROFILING_LIBRARY_ERROR": "profiling_library_error",
    "DCGM_ST_MODULE_NOT_LOADED": "module_not_loaded",
    "DCGM_ST_NOT_SUPPORTED": "not_supported",
    "DCGM_ST_GPU_NOT_SUPPORTED": "not_supported",
    "DCGM_ST_NO_PERMISSION": "no_permission",
    "DCGM_ST_REQUIRES_ROOT": "no_permission",
    "DCGM_ST_TIMEOUT": "timeout",
    "DCGM_ST_GPU_IS_LOST": "gpu_lost",
    "DCGM_ST_NOT_WATCHED": "not_watched",
    "DCGM_ST_NO_DATA": "no_data",
    "DCGM_ST_LIBRARY_NOT_FOUND": "library_not_found",
    "DCGM_ST_FUNCTION_NOT_FOUND": "function_not_found",
    "DCGM_ST_UNINITIALIZED": "uninitialized",
    "DCGM_ST_INIT_ERROR": "init_error",
    "DCGM_ST_DUPLICATE_KEY": "duplicate_key",
    "DCGM_ST_INSTANCE_NOT_FOUND": "instance_not_found",
}
# Kinds that mean "another tool holds the profiler": a counted gap until it lets go.
PROFILER_BUSY_KINDS = frozenset({"profiler_in_use", "profiling_multi_pass"})


class DcgmCallError(Exception):
    """A DCGM call failed; ``kind`` is stable across DCGM versions."""

    def __init__(self, function: str, kind: str, code: int | None, message: str) -> None:
        super().__init__(f"{function}: {message}")
        self.function = function
        self.kind = kind
        self.code = code


@dataclass(frozen=True)
class DcgmBindings:
    """DCGM's binding modules, as loaded from its bindings directory."""

    structs: ModuleType
    agent: ModuleType
    fields: ModuleType
    value: ModuleType
    path: str
    kinds: dict[int, str] = field(default_factory=dict)


def load_bindings(paths: Sequence[Path] = DEFAULT_BINDINGS_PATHS) -> DcgmBindings:
    """Import DCGM's bindings from the first directory holding them. Raises SamplerError."""
    found = next((p for p in paths if (p / "dcgm_agent.py").is_file()), None)
    if found is None:
        raise SamplerError(
            "DCGM Python bindings not found (looked for dcgm_agent.py in "
            + ", ".join(str(p) for p in paths)
            + "); install DCGM or pass the bindings directory"
        )
    if str(found) not in sys.path:
        sys.path.insert(0, str(found))
    try:
        structs = importlib.import_module("dcgm_structs")
        agent = importlib.import_module("dcgm_agent")
        fields = importlib.import_module("dcgm_fields")
        value = importlib.import_module("dcgmvalue")
    except Exception as e:  # the bindings run code at import; any failure means unusable
        raise SamplerError(f"DCGM Python bindings in {found} failed to import: {e}") from None
    loaded_from = getattr(agent, "__file__", "") or ""
    if loaded_from and Path(loaded_from).parent != found:
        log.info("DCGM bindings already imported from %s (asked for %s)", loaded_from, found)
    kinds = {getattr(structs, n): k for n, k in _KIND_NAMES.items() if hasattr(structs, n)}
    return DcgmBindings(structs, agent, fields, value, str(found), kinds)


def dcgm_query(b: DcgmBindings, function: str, *args: Any) -> Any:
    """Call ``dcgm_agent.<function>(*args)``, mapping every failure to DcgmCallError."""
    fn = getattr(b.agent, function, None)
    if fn is None:
        raise DcgmCallError(function, "function_not_found", None, "not in these DCGM bindings")
    try:
        return fn(*args)
    except b.structs.DCGMError as e:
        code = getattr(e, "value", None)
        kind = b.kinds.get(code, "unknown") if isinstance(code, int) else "unknown"
        raise DcgmCallError(function, kind, code, str(e)) from None


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """``embedded``, ``unix:///path``, ``/path`` or ``host[:port]`` -> (mode, address)."""
    e = endpoint.strip()
    if e == "embedded":
        return "embedded", None
    if e.startswith("unix://"):
        return "unix", e[len("unix://") :]
    if e.startswith("/"):
        return "unix", e
    if e.startswith("tcp://"):
        e = e[len("tcp://") :]
    if not e:
        raise SamplerError("empty DCGM endpoint; use host:port, unix:///path or embedded")
    return "tcp", e


@dataclass
class _Unit:
    info: GpuInfo
    entity_group: int
    entity_id: int
    gpu_id: int  # DCGM id of the physical GPU (clock source)
    fields: dict[int, Metric]  # profiling fields this unit reports
    acct_s: float = 0.0  # end of the time already reported: t0 of the next sample
    synced: bool = False  # acct_s is the timestamp of a consumed DCGM window's end
    rows: dict[int, dict[int, float | None]] = field(default_factory=dict)  # ts_us -> values
    warned: set[str] = field(default_factory=set)


class DcgmSampler:
    """A Sampler over DCGM profiling fields. Constructing it connects and enumerates units."""

    name = "dcgm"

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        bindings_paths: Sequence[Path] = DEFAULT_BINDINGS_PATHS,
        interval_s: float = 0.1,
        update_period_s: float | None = None,
        clock_period_s: float = 0.02,
        connect_timeout_s: float = 5.0,
        reconnect_s: float = 5.0,
        sm_count_for: Callable[[int, int | None], int | None] | None = None,
        devices: list[int] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        stop: threading.Event | None = None,
        bindings: DcgmBindings | None = None,
    ) -> None:
        if interval_s <= 0:
            raise SamplerError("DCGM interval must be positive")
        self._b = bindings or load_bindings(bindings_paths)
        self.interval_s = interval_s
        self.update_period_s = update_period_s or interval_s
        self._clock_period = max(0.001, min(clock_period_s, self.update_period_s))
        self._mode, self._address = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout_s
        self._reconnect_s = reconnect_s
        self._sm_count_for = sm_count_for
        self._clock = clock
        self._sleep = sleep
        self._stop = stop or threading.Event()
        self.errors: dict[tuple[str, str], int] = {}
        self._closed = False
        self._handle: Any = None
        self._ids: dict[str, int] = {}
        self._prof_error: DcgmCallError | None = None
        self._next_connect = 0.0
        self._next_rewatch = 0.0
        self._since = {"prof": 0, "clock": 0}
        self._clock_rows: dict[int, list[tuple[int, float]]] = {}
        self._sink: list[tuple[int, int, int, int, float | None]] = []
        self._callback = self._b.agent.dcgmFieldValueEntityEnumeration_f(self._on_values)
        self._names = itertools.count()
        try:
            self._b.structs._dcgmInit()
            self._q("dcgmInit")
        except (self._b.structs.DCGMError, DcgmCallError) as e:
            raise SamplerError(f"cannot load libdcgm ({e}); is DCGM installed?") from None
        try:
            self._connect()
        except DcgmCallError as e:
            raise SamplerError(f"cannot connect to DCGM at {endpoint} ({e.kind}: {e})") from None
        try:
            self._units = self._enumerate(devices)
        except DcgmCallError as e:
            self.close()
            raise SamplerError(f"cannot enumerate GPUs through DCGM ({e.kind}: {e})") from None
        if not self._units:
            self.close()
            raise SamplerError("DCGM reports no GPUs on this node")
        now = self._clock()
        for u in self._units:
            u.acct_s = now
        self._setup_watches()
        self._anchor(now + max(2.5 * self.update_period_s, 0.5))
        self._deadline = self._clock() + interval_s

    # ------------------------------------------------------------ plumbing

    def _q(self, function: str, *args: Any) -> Any:
        return dcgm_query(self._b, function, *args)

    def _count(self, unit: _Unit, kind: str, message: str) -> None:
        key = (unit.info.key, kind)
        self.errors[key] = self.errors.get(key, 0) + 1
        if kind not in unit.warned:
            unit.warned.add(kind)
            log.warning("gpu %s: %s (further occurrences at debug)", unit.info.key, message)
        else:
            log.debug("gpu %s: %s", unit.info.key, message)

    def _connect(self) -> None:
        if self._mode == "embedded":
            self._handle = self._q("dcgmStartEmbedded", self._b.structs.DCGM_OPERATION_MODE_AUTO)
            return
        params = self._b.structs.c_dcgmConnectV2Params_v2()
        # Our watches and groups must go away with us: never leave a stale watch that keeps
        # the profiler busy for other clients (dcgm-exporter).
        params.persistAfterDisconnect = 0
        params.timeoutMs = int(self._connect_timeout * 1000)
        params.addressIsUnixSocket = 1 if self._mode == "unix" else 0
        self._handle = self._q(
            "dcgmConnect_v2", self._address, params, self._b.structs.c_dcgmConnectV2Params_version2
        )

    # ------------------------------------------------------------ enumeration

    def _enumerate(self, devices: list[int] | None) -> list[_Unit]:
        units: list[_Unit] = []
        gpu_ids = self._q("dcgmGetAllSupportedDevices", self._handle)
        try:
            hierarchy = self._q("dcgmGetGpuInstanceHierarchy", self._handle)
            entries = [hierarchy.entityList[i] for i in range(hierarchy.count)]
        except DcgmCallError as e:
            log.info("DCGM GPU instance hierarchy unavailable (%s); treating GPUs as whole", e)
            entries = []
        for gpu_id in gpu_ids:
            if devices is not None and gpu_id not in devices:
                continue
            try:
                units.extend(self._units_of(int(gpu_id), entries))
            except DcgmCallError as e:
                log.warning("gpu %d: cannot be enumerated through DCGM (%s); skipping it", gpu_id, e)
        return units

    def _units_of(self, gpu_id: int, entries: list[Any]) -> list[_Unit]:
        attrs = self._q("dcgmGetDeviceAttributes", self._handle, gpu_id)
        name = _text(attrs.identifiers.deviceName)
        uuid = _text(attrs.identifiers.uuid)
        try:
            arch = ARCHITECTURE_CODES.get(
                int(self._q("dcgmGetGpuChipArchitecture", self._handle, gpu_id)), "unknown"
            )
        except DcgmCallError:
            arch = "unknown"
        fields, reason = self._profiling_support(gpu_id, arch)
        metrics = frozenset(fields.values())
        instances = [
            e
            for e in entries
            if e.entity.entityGroupId == _FE_GPU_I
            and e.parent.entityGroupId == _FE_GPU
            and e.parent.entityId == gpu_id
        ]
        if not (attrs.settings.migModeEnabled and instances):
            info = GpuInfo(
                key=str(gpu_id),
                index=gpu_id,
                uuid=uuid,
                name=name,
                architecture=arch,
                sm_count=self._sms(gpu_id, None, name),
                metrics=metrics,
                unavailable_reason=reason,
            )
            return [_Unit(info, _FE_GPU, gpu_id, gpu_id, fields)]
        units = []
        for e in instances:
            index = int(e.info.nvmlGpuIndex)
            gi = int(e.info.nvmlInstanceId)
            info = GpuInfo(
                key=f"{index}/gi{gi}",
                index=index,
                uuid=uuid,
                name=name,
                architecture=arch,
                sm_count=self._sms(index, gi, name),
                gpu_instance_id=gi,
                metrics=metrics,
                unavailable_reason=reason,
            )
            units.append(_Unit(info, _FE_GPU_I, int(e.entity.entityId), gpu_id, fields))
        return units

    def _profiling_support(self, gpu_id: int, arch: str) -> tuple[dict[int, Metric], str | None]:
        try:
            groups = self._q("dcgmProfGetSupportedMetricGroups", self._handle, gpu_id)
        except DcgmCallError as e:
            return {}, f"DCGM profiling not available ({e.kind}); tensor activity unavailable on {arch}"
        supported: set[int] = set()
        for i in range(groups.numMetricGroups):
            mg = groups.metricGroups[i]
            supported.update(int(mg.fieldIds[j]) for j in range(mg.numFieldIds))
        fields = {f: m for f, m in _FIELD_METRIC.items() if f in supported}
        if not fields:
            return {}, f"DCGM profiling reports no activity fields on this {arch} GPU"
        missing = sorted(m.value for f, m in _FIELD_METRIC.items() if f not in supported)
        if missing:
            log.info("gpu %d: DCGM does not offer %s on this %s GPU", gpu_id, missing, arch)
        return fields, None

    def _sms(self, index: int, gi: int | None, name: str) -> int | None:
        if self._sm_count_for is not None:
            n = self._sm_count_for(index, gi)
            if n:
                return n
        if gi is not None:
            return None  # a MIG instance's SMs depend on its profile: only the caller knows
        return next((n for sub, n in _DATASHEET_SMS if sub in name), None)

    def gpus(self) -> list[GpuInfo]:
        return [u.info for u in self._units]

    # ------------------------------------------------------------ watches

    def _setup_watches(self) -> None:
        """Our own entity groups and field groups, watched at our own frequencies.

        Never touches other clients' watches. DCGM shares the cache per (entity, field), so the
        fields may update faster than we ask (another watcher) or at the profiling module's
        minimum: windows are taken from timestamps, not from our requested period.
        """
        self._since = {"prof": 0, "clock": 0}
        self._clock_rows = {}
        tag = f"gpuflops-{os.getpid()}-{next(self._names)}"
        prof_units = [u for u in self._units if u.fields]
        try:
            self._ids["prof_group"] = self._group(
                f"{tag}-units", [(u.entity_group, u.entity_id) for u in prof_units]
            )
            gpus = sorted({u.gpu_id for u in self._units})
            self._ids["clock_group"] = self._group(f"{tag}-gpus", [(_FE_GPU, g) for g in gpus])
            self._ids["clock_fields"] = self._q(
                "dcgmFieldGroupCreate", self._handle, [SM_CLOCK_FIELD], f"{tag}-clock"
            )
            fields = sorted({f for u in prof_units for f in u.fields})
            if fields:
                self._ids["prof_fields"] = self._q(
                    "dcgmFieldGroupCreate", self._handle, fields, f"{tag}-prof"
                )
        except DcgmCallError as e:
            self._lost(e)
            return
        keep_s = max(30.0, 10 * self.interval_s)
        try:
            self._q(
                "dcgmWatchFields",
                self._handle,
                self._ids["clock_group"],
                self._ids["clock_fields"],
                int(self._clock_period * 1e6),
                keep_s,
                0,
            )
        except DcgmCallError as e:
            log.warning("DCGM refused to watch the SM clock (%s); FLOPs will be gaps", e)
        self._watch_profiling()

    def _group(self, name: str, entities: list[tuple[int, int]]) -> int:
        gid = self._q("dcgmGroupCreate", self._handle, self._b.structs.DCGM_GROUP_EMPTY, name)
        for eg, eid in entities:
            self._q("dcgmGroupAddEntity", self._handle, gid, eg, eid)
        return int(gid)

    def _watch_profiling(self) -> None:
        if "prof_fields" not in self._ids:
            return
        try:
            self._q(
                "dcgmWatchFields",
                self._handle,
                self._ids["prof_group"],
                self._ids["prof_fields"],
                int(self.update_period_s * 1e6),
                max(30.0, 10 * self.interval_s),
                0,
            )
        except DcgmCallError as e:
            if self._prof_error is None or self._prof_error.kind != e.kind:
                log.warning(
                    "DCGM cannot watch the profiling fields (%s: %s)%s; intervals are gaps until "
                    "it can, retrying every %.0f s",
                    e.kind,
                    e,
                    " - another tool (Nsight, DCGM client) holds the profiler"
                    if e.kind in PROFILER_BUSY_KINDS
                    else "",
                    self._reconnect_s,
                )
            self._prof_error = e
            self._next_rewatch = self._clock() + self._reconnect_s
            return
        if self._prof_error is not None:
            log.warning("DCGM profiling watch restored after %s", self._prof_error.kind)
        self._prof_error = None

    def _lost(self, e: DcgmCallError) -> None:
        if self._handle is not None:
            log.warning(
                "lost the DCGM host engine at %s (%s); reconnecting every %.0f s",
                self.endpoint,
                e,
                self._reconnect_s,
            )
        self._handle = None
        self._ids = {}
        self._next_connect = self._clock() + self._reconnect_s

    def _ensure_connected(self) -> None:
        now = self._clock()
        if self._handle is None and now >= self._next_connect:
            try:
                self._connect()
            except DcgmCallError as e:
                log.debug("DCGM reconnect failed: %s", e)
                self._next_connect = now + self._reconnect_s
                return
            log.warning("reconnected to the DCGM host engine at %s", self.endpoint)
            self._setup_watches()
        elif self._handle is not None and self._prof_error is not None and now >= self._next_rewatch:
            self._watch_profiling()

    # ------------------------------------------------------------ reading

    def _on_values(self, eg: int, eid: int, values: Any, n: int, _user: Any) -> int:
        # Runs inside DCGM's enumeration: copy out plain numbers, never raise.
        ok = self._b.structs.DCGM_ST_OK
        for i in range(n):
            v = values[i]
            val: float | None
            if v.status != ok:
                val = None
            elif chr(v.fieldType) == "d":
                val = float(v.value.dbl)
                if val >= self._b.value.DCGM_FP64_BLANK:
                    val = None
            else:
                iv = int(v.value.i64)
                val = None if iv >= self._b.value.DCGM_INT64_BLANK else float(iv)
            self._sink.append((int(eg), int(eid), int(v.fieldId), int(v.ts), val))
        return 0

    def _read(self, which: str) -> None:
        gid = self._ids.get(f"{which}_group")
        fid = self._ids.get(f"{which}_fields")
        if gid is None or fid is None:
            return
        self._sink = []
        nxt = self._q(
            "dcgmGetValuesSince_v2", self._handle, gid, fid, self._since[which], self._callback, None
        )
        self._since[which] = int(nxt)
        by_entity = {(u.entity_group, u.entity_id): u for u in self._units}
        for eg, eid, fid_, ts, val in self._sink:
            if which == "clock":
                if fid_ == SM_CLOCK_FIELD and val is not None:
                    self._clock_rows.setdefault(eid, []).append((ts, val * 1e6))
                continue
            u = by_entity.get((eg, eid))
            if u is not None and fid_ in u.fields and ts / 1e6 > u.acct_s - 1e-6:
                u.rows.setdefault(ts, {})[fid_] = val
        self._sink = []

    def _read_all(self) -> DcgmCallError | None:
        if self._handle is None:
            return DcgmCallError("connect", "connection_lost", None, "not connected")
        try:
            self._read("clock")
            if self._prof_error is None:
                self._read("prof")
        except DcgmCallError as e:
            if e.kind == "connection_lost":
                self._lost(e)
            return e
        return None

    def _anchor(self, until: float) -> None:
        """Wait (bounded) for DCGM's first fresh window so the first interval is measured."""
        while not self._stop.is_set():
            if self._read_all() is not None or self._prof_error is not None:
                return
            now = self._clock()
            for u in self._units:
                fresh = [ts for ts in u.rows if ts / 1e6 > u.acct_s - 2 * self.update_period_s]
                if fresh and not u.synced:
                    ts = max(fresh)
                    u.acct_s, u.synced = ts / 1e6, True
                    u.rows = {t: r for t, r in u.rows.items() if t > ts}
            if all(u.synced or not u.fields for u in self._units) or now >= until:
                return
            self._sleep(min(self._clock_period, max(0.0, until - now)))

    # ------------------------------------------------------------ sampling

    def _clock_mean(self, gpu_id: int, a_us: int, b_us: int) -> tuple[float | None, int]:
        rows = self._clock_rows.get(gpu_id, [])
        inside = [hz for ts, hz in rows if a_us < ts <= b_us]
        if inside:
            return sum(inside) / len(inside), len(inside)
        before = [(ts, hz) for ts, hz in rows if ts <= b_us and b_us - ts <= 1e6]
        if before:
            return max(before)[1], 1
        return None, 0

    def _gap(self, u: _Unit, t1: float, error: str, clock_hz: float | None = None) -> GpuSample:
        t0 = u.acct_s
        u.acct_s = max(t0, t1)
        return GpuSample(u.info.key, t0, u.acct_s, None, clock_hz, error=error)

    def _sample_unit(self, u: _Unit, now: float, err: DcgmCallError | None) -> GpuSample:
        if not u.fields:
            a = int(u.acct_s * 1e6)
            hz, n = self._clock_mean(u.gpu_id, a, int(now * 1e6))
            s = self._gap(u, now, "tensor_activity_unavailable", hz)
            return GpuSample(s.key, s.t0_s, s.t1_s, None, hz, n, error=s.error)
        if err is not None or self._handle is None:
            kind = err.kind if err is not None else "connection_lost"
            self._count(u, kind, f"DCGM read failed: {err or 'not connected'}")
            u.synced = False
            u.rows = {}
            return self._gap(u, now, kind)
        if self._prof_error is not None:
            kind = self._prof_error.kind
            self._count(u, kind, f"DCGM profiling unavailable: {self._prof_error}")
            u.synced = False
            u.rows = {}
            return self._gap(u, now, kind)
        ready = sorted(ts for ts in u.rows if ts / 1e6 > u.acct_s + 1e-7)
        if not ready:
            self._count(u, "no_data", "DCGM produced no new profiling values this interval")
            u.synced = False
            return self._gap(u, now, "no_data")
        if not u.synced:
            # The first window after a gap may have started inside it: anchor on it instead.
            t1 = ready[-1]
            u.rows = {}
            u.synced = True
            return self._gap(u, t1 / 1e6, "resync")
        return self._measure(u, ready)

    def _measure(self, u: _Unit, ready: list[int]) -> GpuSample:
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
            hz, n = self._clock_mean(u.gpu_id, prev, ts)
            prev = ts
            if hz is None:
                u.acct_s = ts / 1e6
                u.rows = {}
                self._count(u, "no_clock", "no SM clock value from DCGM for this window")
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
            self._count(u, "blank", "DCGM returned blank profiling values (profiler busy or paused?)")
            return GpuSample(u.info.key, t0, t1, None, clock_hz, reads, error="blank")
        error = None
        if blank:
            error = "partial_blank"
            self._count(u, error, f"DCGM returned blank values for {sorted(m.value for m in blank)}")
        return GpuSample(u.info.key, t0, t1, activity, clock_hz, reads, error=error)

    def sample(self) -> list[GpuSample]:
        if self._closed:
            raise StopIteration
        while True:
            now = self._clock()
            if now >= self._deadline:
                break
            self._sleep(min(self._clock_period, self._deadline - now))
            if self._stop.is_set():
                raise StopIteration
        self._ensure_connected()
        err = self._read_all()
        # DCGM publishes a window a little after its end: poll briefly for units still waiting.
        give_up = self._clock() + max(self.update_period_s, 0.05)
        while err is None and self._prof_error is None and self._waiting() and not self._stop.is_set():
            if self._clock() >= give_up:
                break
            self._sleep(self._clock_period)
            err = self._read_all()
        now = self._clock()
        out = [self._sample_unit(u, now, err) for u in self._units]
        self._prune()
        measured = [s.t1_s for s in out if s.activity is not None or s.error == "resync"]
        base = max(measured) if measured else now
        # Read again just after DCGM's next window should close.
        self._deadline = base + self.interval_s + min(0.01, self.interval_s / 10)
        if self._deadline <= self._clock():
            self._deadline = self._clock() + self.interval_s
        return out

    def _waiting(self) -> bool:
        return any(u.fields and not any(ts / 1e6 > u.acct_s + 1e-7 for ts in u.rows) for u in self._units)

    def _prune(self) -> None:
        oldest = min(u.acct_s for u in self._units) - 2.0
        for gpu_id, rows in self._clock_rows.items():
            self._clock_rows[gpu_id] = [r for r in rows if r[0] / 1e6 >= oldest]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._stop.set()
        if self._handle is None:
            return
        # Undo only what we created, so other clients' watches on the same engine stay put.
        for group, fields in (("prof_group", "prof_fields"), ("clock_group", "clock_fields")):
            if group in self._ids and fields in self._ids:
                self._quiet("dcgmUnwatchFields", self._handle, self._ids[group], self._ids[fields])
        for name in ("prof_fields", "clock_fields"):
            if name in self._ids:
                self._quiet("dcgmFieldGroupDestroy", self._handle, self._ids[name])
        for name in ("prof_group", "clock_group"):
            if name in self._ids:
                self._quiet("dcgmGroupDestroy", self._handle, self._ids[name])
        if self._mode == "embedded":
            self._quiet("dcgmStopEmbedded", self._handle)
        else:
            self._quiet("dcgmDisconnect", self._handle)
        self._handle = None

    def _quiet(self, function: str, *args: Any) -> None:
        try:
            self._q(function, *args)
        except DcgmCallError as e:
            log.debug("%s during close: %s", function, e)

    def describe(self) -> dict[str, Any]:
        """Facts for a trace header: endpoint, bindings directory, host."""
        return {
            "dcgm_endpoint": self.endpoint,
            "dcgm_bindings": self._b.path,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "update_period_s": self.update_period_s,
            "clock_period_s": self._clock_period,
        }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
