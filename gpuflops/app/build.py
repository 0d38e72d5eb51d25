"""Composition root: the only place that builds real objects and wires the pipeline.

sampler -> integrator -> attribution -> ledger -> totals -> exporter, with the job socket
feeding attribution (pid -> job) and the ledger (registrations, analytic estimates).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket as socket_module
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

from prometheus_client.registry import Collector, CollectorRegistry

from gpuflops import __version__
from gpuflops.config import Settings, demo_trace_path
from gpuflops.exporter.collector import AttributionCollector, FlopsCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.exporter.state import Totals
from gpuflops.model import UNATTRIBUTED, AttributedInterval, FlopsRow, GpuInfo, GpuSample
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.rates import HMMA_PRECISIONS
from gpuflops.sampler.base import Sampler, SamplerError

log = logging.getLogger(__name__)


JobResolver = Callable[[int], tuple[str, str]]
PrecisionOf = Callable[[str, str], str | None]  # (job, program) -> declared HMMA precision
StepHook = Callable[[list[GpuSample]], None]
RowSink = Callable[[list[tuple[float, float, list[FlopsRow]]], int], None]
GapSink = Callable[[str, str, float, float, str], None]


class NoDriverError(SamplerError):
    """``--backend auto`` found no usable NVIDIA driver."""


def build_sampler(settings: Settings, stop: threading.Event) -> Sampler:
    """The configured backend. ``auto`` never falls back to a replay silently."""
    if settings.backend == "replay":
        from gpuflops.sampler.replay import ReplaySampler

        path = Path(settings.replay_path) if settings.replay_path else demo_trace_path()
        return ReplaySampler(path, speed=settings.replay_speed, loop=settings.replay_loop, stop=stop)
    from gpuflops.sampler.select import select_backend

    sm_counts: dict[tuple[int, int | None], int | None] = {}

    def nvml() -> Sampler:
        from gpuflops.sampler.nvml import NvmlSampler

        sampler = NvmlSampler(
            interval_s=settings.interval_s,
            clock_period_s=settings.clock_period_s,
            process_period_s=settings.process_period_s,
            stop=stop,
            devices=list(settings.devices) if settings.devices is not None else None,
        )
        for g in sampler.gpus():  # DCGM has no SM-count field: NVML's is reused there
            sm_counts[(g.index, g.gpu_instance_id)] = g.sm_count
        return sampler

    def dcgm() -> Sampler:
        from gpuflops.config import DEFAULT_DCGM_BINDINGS
        from gpuflops.sampler.dcgm.sampler import DcgmSampler

        paths = [Path(p) for p in settings.dcgm_bindings] or list(DEFAULT_DCGM_BINDINGS)
        return DcgmSampler(
            endpoint=settings.dcgm_endpoint,
            bindings_paths=paths,
            interval_s=settings.interval_s,
            clock_period_s=settings.clock_period_s,
            sm_count_for=lambda index, gi: sm_counts.get((index, gi)),
            devices=list(settings.devices) if settings.devices is not None else None,
            stop=stop,
        )

    try:
        return select_backend(settings, nvml=nvml, dcgm=dcgm)
    except SamplerError as e:
        if settings.backend == "auto":
            raise NoDriverError(
                f"no usable NVIDIA GPU found: {e}\n"
                "gpuflops measures real GPUs only and will not invent numbers. To see it work "
                "on this machine, run `gpuflops daemon --demo`, which replays a trace recorded "
                "on an NVIDIA H100."
            ) from None
        raise


K = TypeVar("K")
V = TypeVar("V")


class _Memo(Generic[K, V]):
    """Answers kept for one second: lookups that read /proc or copy the job registry run for
    every process of every interval."""

    def __init__(self, resolve: Callable[[K], V], clock: Callable[[], float], ttl_s: float = 1.0) -> None:
        self._resolve = resolve
        self._clock = clock
        self._ttl = ttl_s
        self._cache: dict[K, tuple[float, V]] = {}

    def __call__(self, key: K) -> V:
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        value = self._resolve(key)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now, value)
        return value


@dataclass
class Pipeline:
    """One sampling step end to end; usable without threads (tests, benchmarks)."""

    gpus: list[GpuInfo]
    integrator: Integrator
    attributor: ProcessAttributor
    totals: Totals
    resolve_job: JobResolver = lambda _pid: (UNATTRIBUTED, UNATTRIBUTED)
    precision_of: PrecisionOf | None = None
    sink: RowSink | None = None
    on_gap: GapSink | None = None  # (gpu, uuid, t0_s, t1_s, reason) of each unmeasured interval
    on_step: list[StepHook] = field(default_factory=list)  # every step's samples (recording)

    def __post_init__(self) -> None:
        self._infos = {g.key: g for g in self.gpus}

    def step(self, samples: list[GpuSample]) -> None:
        settled: list[AttributedInterval] = []
        for s in samples:
            info = self._infos.get(s.key)
            if info is None:
                log.warning("sample for unknown unit %r ignored", s.key)
                continue
            flops = self.integrator.integrate(info, s, self._job_precision(s))
            self.totals.record_live(s, flops)
            if flops.gap_reason is not None and self.on_gap is not None:
                self.on_gap(info.key, info.uuid, flops.t0_s, flops.t1_s, flops.gap_reason)
            settled.extend(self.attributor.add(s, flops))
        for hook in self.on_step:
            hook(samples)
        self._settle(settled)

    def flush(self) -> None:
        self._settle(self.attributor.flush())

    def _job_precision(self, s: GpuSample) -> str | None:
        """The HMMA precision every job on this unit declared, if they agree."""
        if self.precision_of is None or not s.processes or not s.activity:
            return None
        found = set()
        for p in s.processes:
            job, program = self.resolve_job(p.pid)
            found.add(self.precision_of(job, program) if job != UNATTRIBUTED else None)
        if len(found) == 1:
            (only,) = found
            return only if only in HMMA_PRECISIONS else None
        return None

    def _settle(self, settled: list[AttributedInterval]) -> None:
        batch: list[tuple[float, float, list[FlopsRow]]] = []
        for item in settled:
            info = self._infos[item.key]
            rows = []
            for share in item.shares:
                job, program = (
                    (UNATTRIBUTED, UNATTRIBUTED) if share.pid is None else self.resolve_job(share.pid)
                )
                rows.append(
                    FlopsRow(item.key, info.uuid, share.pipe.value, share.precision, job, program,
                        share.pid, share.flops, share.comm)
                )
            if rows:
                batch.append((item.t0_s, item.t1_s, rows))
        held = self.attributor.held()
        if self.sink is not None:
            self.sink(batch, held)
        else:
            self.totals.add_rows((r for _a, _b, rows in batch for r in rows), held)


class Daemon:
    """Runs the sampling loop in the calling thread and the endpoints in others."""

    def __init__(
        self,
        settings: Settings,
        sampler: Sampler,
        *,
        stop: threading.Event,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.stop = stop
        self.clock = clock
        gpus = sampler.gpus()
        per_gpu = dict(settings.hmma_precision_per_gpu)
        self.integrator = Integrator(lambda key: per_gpu.get(key, settings.hmma_precision))
        self.totals = Totals(gpus, process_ttl_s=settings.process_ttl_s, clock=clock)
        self.pipeline = Pipeline(
            gpus,
            self.integrator,
            ProcessAttributor(
                settings.attribution_hold_s,
                analytic=settings.analytic_split,
                analytic_tolerance=settings.analytic_split_tolerance,
            ),
            self.totals,
        )
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.registry.register(FlopsCollector(self.totals.snapshot, sampler.name))
        attributor = self.pipeline.attributor
        self.registry.register(AttributionCollector(
            lambda: dict(attributor.stats),
            lambda: dict(attributor.timesliced_flops),
            {g.key: g.uuid for g in gpus},
        ))
        self._last_loop_s: float | None = None
        self._started_s = clock()
        self.server: MetricsServer | None = None
        self._closers: list[Callable[[], None]] = []
        self._periodic: list[tuple[float, Callable[[], None]]] = []
        self._next_periodic: list[float] = []
        for g in gpus:
            if not g.metrics:
                log.warning(
                    "gpu %s (%s): %s. gpuflops exports what NVML offers for it and counts no "
                    "FLOPs; gpuflops_gpu_tensor_activity_available is 0.",
                    g.key,
                    g.name,
                    g.unavailable_reason,
                )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def add_closer(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def every(self, period_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the sampling thread about every ``period_s`` (and at once)."""
        self._periodic.append((period_s, fn))
        self._next_periodic.append(0.0)

    def health(self) -> tuple[bool, str]:
        now = self.clock()
        limit = max(5.0, 10 * self.settings.interval_s)
        if self._last_loop_s is None:
            if now - self._started_s < limit:
                return True, "starting"
            return False, "no sampling interval completed yet"
        age = now - self._last_loop_s
        if age > limit:
            return False, f"sampling loop stalled: last interval {age:.1f}s ago"
        return True, "ok"

    def serve(self, **http_kwargs: Any) -> None:
        self.server = MetricsServer(self.registry, self.settings.listen, self.health, **http_kwargs)
        self.server.start()
        log.info("serving /metrics on %s (port %d)", self.settings.listen, self.server.port)

    def run(
        self,
        on_ready: Callable[[], object] | None = None,
        on_tick: Callable[[], object] | None = None,
    ) -> None:
        """Sample until stopped or the source ends; always flushes and closes."""
        ready = False
        try:
            while not self.stop.is_set():
                try:
                    samples = self.sampler.sample()
                except StopIteration:
                    break
                self.pipeline.step(samples)
                errors = getattr(self.sampler, "errors", None)
                if errors:
                    self.totals.count_errors(errors)
                self._run_periodic()
                self._last_loop_s = self.clock()
                if on_tick is not None:
                    on_tick()
                if not ready and on_ready is not None:
                    on_ready()
                    ready = True
        finally:
            self.pipeline.flush()
            self.close()

    def _run_periodic(self) -> None:
        now = self.clock()
        for i, (period, fn) in enumerate(self._periodic):
            if now >= self._next_periodic[i]:
                self._next_periodic[i] = now + period
                try:
                    fn()
                except Exception:
                    log.exception("periodic task failed; will retry")

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("error during shutdown")
        self._closers.clear()
        self.sampler.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


def wire_jobs(d: Daemon, *, socket: bool = True) -> Any:
    """Job socket, process -> job mapping, ledger and program evaluation, as configured."""
    from gpuflops.compliance.reconcile import normalize_precision
    from gpuflops.compliance.thresholds import load_programs_config
    from gpuflops.exporter.jobs_collector import JobsCollector
    from gpuflops.identity.mapper import JobIdentity, JobMapper
    from gpuflops.jobs.records import PsutilProcessLookup, RegistryEvent
    from gpuflops.jobs.registry import JobRegistry
    from gpuflops.jobs.server import JobSocketServer
    from gpuflops.ledger.sink import LedgerSink, ProgramView

    s = d.settings
    registry = JobRegistry(process_lookup=PsutilProcessLookup(), clock=d.clock)

    def from_socket(pid: int) -> JobIdentity | None:
        ref = registry.job_for_pid(pid)
        return None if ref is None else JobIdentity(ref.job_id, ref.program_id, "socket", {})

    kubelet = None
    if s.kubelet_url:
        from gpuflops.identity.kubelet import KubeletClient, urllib_fetch

        kubelet = KubeletClient(
            url=s.kubelet_url,
            fetch=urllib_fetch(
                Path(s.kubelet_ca_file) if s.kubelet_ca_file else None,
                verify_tls=not s.kubelet_insecure_tls,
            ),
        )
    mapper = JobMapper(order=s.job_sources, socket_lookup=from_socket, kubelet=kubelet)

    def resolve(pid: int) -> tuple[str, str]:
        ref = mapper.resolve(pid)
        return ref.job, ref.program

    def declared_precision(job: str) -> str | None:
        snap = registry.snapshot().job(job)
        return None if snap is None else normalize_precision(snap.metadata.get("precision"))

    declared = _Memo(declared_precision, d.clock)

    def precision_of(job: str, program: str) -> str | None:
        """The HMMA precision a job declared at registration."""
        return declared(job)

    ledger = _open_ledger(s, d.clock) if s.ledger else None
    sink = LedgerSink(ledger, d.totals, clock=d.clock, commit_every_s=s.ledger_commit_s)
    registry.on_event(sink.on_job_event)
    attributor = d.pipeline.attributor

    def analytic_report(event: RegistryEvent) -> None:
        """Analytic work reported by a process: weights for splitting a GPU it shares."""
        if event.kind == "add":
            attributor.record_analytic(event.peer.pid, event.time_s, float(event.data["flops"]))

    registry.on_event(analytic_report)
    p = d.pipeline
    p.resolve_job = _Memo(resolve, d.clock)
    p.precision_of = precision_of
    p.sink = sink.commit
    p.on_gap = sink.on_gap
    sink.start_session(
        {"version": __version__, "backend": d.sampler.name, "host": socket_module.gethostname()},
        [(g.key, g.uuid) for g in p.gpus],
    )
    programs_cfg = load_programs_config(Path(s.program_config) if s.program_config else None)
    view = [ProgramView()]

    def refresh_programs() -> None:
        if ledger is None:
            return
        from gpuflops.compliance.programs import evaluate_ledger

        statuses, errors = evaluate_ledger(ledger, programs_cfg)
        view[0] = ProgramView(MappingProxyType(statuses), MappingProxyType(errors), d.clock())

    d.every(s.program_refresh_s, refresh_programs)
    # Closers run last-added first: the socket stops before the ledger takes its last commit.
    d.add_closer(sink.close)
    server = None
    if socket:
        server = JobSocketServer(
            registry, s.socket_path, mode=s.socket_mode, group=s.socket_group
        )
        server.start()
        d.add_closer(server.stop)
        log.info("job socket listening on %s", s.socket_path)
    d.add_collector(
        JobsCollector(d.totals.snapshot, lambda: view[0], registry.snapshot, sink,
                      server.stats if server else None)
    )
    return registry


def _open_ledger(s: Settings, clock: Callable[[], float]) -> Any:
    from gpuflops.ledger.records import LEDGER_FILENAME, LedgerError
    from gpuflops.ledger.store import open_or_quarantine

    path = Path(s.state_dir) / LEDGER_FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sync: Literal["NORMAL", "FULL"] = "FULL" if s.ledger_sync == "FULL" else "NORMAL"
        ledger, moved = open_or_quarantine(path, clock=clock, synchronous=sync)
    except (LedgerError, OSError) as e:
        log.error(
            "ledger %s cannot be used (%s); metering continues WITHOUT persistence: counters "
            "will restart at zero and nothing is written to the file",
            path,
            e,
        )
        return None
    if moved is not None:
        log.warning("ledger %s was corrupt; moved intact to %s and started a new one", path, moved)
    return ledger


@contextlib.contextmanager
def handle_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``; the loop then finishes its interval and exits."""

    def _handler(signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
