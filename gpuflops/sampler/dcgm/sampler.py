"""DCGM backend: profiling fields (SM/tensor/pipe activity) and the SM clock from a host engine.

Every DCGM call goes through the bindings module (gpuflops/sampler/dcgm/bindings.py). Units are
converted here: MHz -> Hz, DCGM's microsecond timestamps -> seconds.

Each :meth:`DcgmSampler.sample` reads every value since the last read (``dcgmGetValuesSince_v2``)
and emits one interval per unit; how DCGM's update windows become intervals is in windows.py,
which units DCGM offers is in units.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpuflops.config import DEFAULT_DCGM_BINDINGS, DEFAULT_DCGM_ENDPOINT
from gpuflops.model import GpuInfo, GpuSample
from gpuflops.sampler.base import (
    ErrorCounts,
    SamplerError,
    host_facts,
    next_deadline,
    wait_until,
)
from gpuflops.sampler.dcgm.bindings import (
    FE_GPU,
    PROFILER_BUSY_KINDS,
    SM_CLOCK_FIELD,
    DcgmBindings,
    DcgmCallError,
    dcgm_query,
    load_bindings,
    parse_endpoint,
)
from gpuflops.sampler.dcgm.units import enumerate_units
from gpuflops.sampler.dcgm.windows import Unit, clock_mean, gap, measure

log = logging.getLogger(__name__)

class DcgmSampler:
    """A Sampler over DCGM profiling fields. Constructing it connects and enumerates units."""

    name = "dcgm"

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_DCGM_ENDPOINT,
        bindings_paths: Sequence[Path] = DEFAULT_DCGM_BINDINGS,
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
        self._clock = clock
        self._sleep = sleep
        self._stop = stop or threading.Event()
        self._errors = ErrorCounts(log)
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
            self._units = enumerate_units(self._q, self._handle, devices, sm_count_for)
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

    def _count(self, unit: Unit, kind: str, message: str) -> None:
        self._errors.count(unit.info.key, kind, message)

    @property
    def errors(self) -> dict[tuple[str, str], int]:
        return self._errors.counts

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
            self._ids["clock_group"] = self._group(f"{tag}-gpus", [(FE_GPU, g) for g in gpus])
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

    def _sample_unit(self, u: Unit, now: float, err: DcgmCallError | None) -> GpuSample:
        if not u.fields:
            a = int(u.acct_s * 1e6)
            hz, n = clock_mean(self._clock_rows.get(u.gpu_id, []), a, int(now * 1e6))
            s = gap(u, now, "tensor_activity_unavailable", hz)
            return GpuSample(s.key, s.t0_s, s.t1_s, None, hz, n, error=s.error)
        if err is not None or self._handle is None:
            kind = err.kind if err is not None else "connection_lost"
            self._count(u, kind, f"DCGM read failed: {err or 'not connected'}")
            u.synced = False
            u.rows = {}
            return gap(u, now, kind)
        if self._prof_error is not None:
            kind = self._prof_error.kind
            self._count(u, kind, f"DCGM profiling unavailable: {self._prof_error}")
            u.synced = False
            u.rows = {}
            return gap(u, now, kind)
        ready = sorted(ts for ts in u.rows if ts / 1e6 > u.acct_s + 1e-7)
        if not ready:
            self._count(u, "no_data", "DCGM produced no new profiling values this interval")
            u.synced = False
            return gap(u, now, "no_data")
        if not u.synced:
            # The first window after a gap may have started inside it: anchor on it instead.
            t1 = ready[-1]
            u.rows = {}
            u.synced = True
            return gap(u, t1 / 1e6, "resync")
        return measure(u, ready, self._clock_rows.get(u.gpu_id, []), self._count)

    def sample(self) -> list[GpuSample]:
        if self._closed:
            raise StopIteration
        wait_until(self._deadline, clock=self._clock, sleep=self._sleep, stop=self._stop,
                   period_s=self._clock_period)
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
        self._deadline = next_deadline(
            base + self.interval_s + min(0.01, self.interval_s / 10), self._clock, self.interval_s
        )
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
            **host_facts(),
            "update_period_s": self.update_period_s,
            "clock_period_s": self._clock_period,
        }
