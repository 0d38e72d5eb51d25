"""Composition root: the only place that builds real objects and wires them together.

sampler -> integrate -> attribute -> label -> ledger sink -> counters -> exporter, with the job
socket feeding the label stage (pid -> job, declared precision), the attribution (analytic
reports) and the ledger (registrations, estimates). Everything is built once, here, and handed
to the stage that uses it; nothing is reassigned afterwards.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prometheus_client.registry import CollectorRegistry

from gpuflops import __version__
from gpuflops.app.daemon import Daemon
from gpuflops.compliance.access import AccessPolicy
from gpuflops.compliance.programs import ProgramEvaluator, ProgramView
from gpuflops.compliance.reconcile import normalize_precision
from gpuflops.compliance.thresholds import load_programs_config
from gpuflops.config import DEFAULT_DCGM_BINDINGS, Settings, demo_trace_path
from gpuflops.exporter.collector import AttributionCollector, FlopsCollector
from gpuflops.exporter.jobs_collector import JobsCollector
from gpuflops.exporter.state import Totals
from gpuflops.identity.kubelet import KubeletClient, urllib_fetch
from gpuflops.identity.mapper import JobIdentity, JobMapper
from gpuflops.jobs.records import AnalyticBound, PsutilProcessLookup, RegistryEvent
from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer, ServerLimits
from gpuflops.ledger.lock import StateDirLock
from gpuflops.ledger.records import LEDGER_FILENAME, LedgerError
from gpuflops.ledger.sink import LedgerSink
from gpuflops.ledger.store import Ledger
from gpuflops.model import GpuInfo
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler, Memo
from gpuflops.pipeline.pipeline import Pipeline, StepHook
from gpuflops.rates import peak_flops_per_s
from gpuflops.sampler.base import Sampler, SamplerError
from gpuflops.sampler.trace import TraceWriter, recording_meta

if TYPE_CHECKING:
    from gpuflops.sampler.nvml import NvmlSampler

log = logging.getLogger(__name__)


class NoDriverError(SamplerError):
    """``--backend auto`` found no usable NVIDIA driver."""


def build_sampler(settings: Settings) -> tuple[Sampler, threading.Event]:
    """The configured backend and its own stop token. ``auto`` never falls back to a replay.

    Every sampler built gets a token of its own, so closing one that ``auto`` passed over
    cannot stop the one it chose.
    """
    if settings.backend == "replay":
        from gpuflops.sampler.replay import ReplaySampler

        stop = threading.Event()
        path = Path(settings.replay_path) if settings.replay_path else demo_trace_path()
        return ReplaySampler(path, speed=settings.replay_speed, loop=settings.replay_loop, stop=stop), stop
    from gpuflops.sampler.select import select_backend

    sm_counts: dict[tuple[int, int | None], int | None] = {}
    tokens: dict[Sampler, threading.Event] = {}  # every sampler built -> its stop token
    nvml_built: list[NvmlSampler] = []

    def nvml() -> Sampler:
        from gpuflops.sampler.nvml import NvmlSampler

        stop = threading.Event()
        sampler = NvmlSampler(
            interval_s=settings.interval_s,
            clock_period_s=settings.clock_period_s,
            process_period_s=settings.process_period_s,
            stop=stop,
            devices=list(settings.devices) if settings.devices is not None else None,
        )
        tokens[sampler] = stop
        nvml_built.append(sampler)
        for g in sampler.gpus():  # DCGM has no SM-count field: NVML's is reused there
            sm_counts[(g.index, g.gpu_instance_id)] = g.sm_count
        return sampler

    def dcgm() -> Sampler:
        from gpuflops.sampler.dcgm.sampler import DcgmSampler

        stop = threading.Event()
        paths = [Path(p) for p in settings.dcgm_bindings] or list(DEFAULT_DCGM_BINDINGS)
        sampler = DcgmSampler(
            endpoint=settings.dcgm_endpoint,
            bindings_paths=paths,
            interval_s=settings.interval_s,
            clock_period_s=settings.clock_period_s,
            sm_count_for=lambda index, gi: sm_counts.get((index, gi)),
            devices=list(settings.devices) if settings.devices is not None else None,
            stop=stop,
        )
        tokens[sampler] = stop
        return sampler

    try:
        chosen = select_backend(settings, nvml=nvml, dcgm=dcgm)
        stop = tokens[chosen]
        if nvml_built and chosen is nvml_built[0]:
            chosen = with_pm_counters(settings, nvml_built[0])
    except SamplerError as e:
        if settings.backend == "auto":
            raise NoDriverError(
                f"no usable NVIDIA GPU found: {e}\n"
                "gpuflops measures real GPUs only and will not invent numbers. To see it work "
                "on this machine, run `gpuflops daemon --demo`, which replays a trace recorded "
                "on an NVIDIA H100."
            ) from None
        raise
    return chosen, stop


def with_pm_counters(settings: Settings, sampler: NvmlSampler) -> Sampler:
    """The NVML sampler with CUPTI PM cycle counts where settings and the node allow them.

    Each GPU's PM session runs in a worker process (sampler/pm_worker.py): CUPTI blocking in
    the driver once froze a daemon that held it in-process (run 23).
    """
    if settings.counters == "nvml":
        return sampler
    from gpuflops.sampler.cupti import check_installed
    from gpuflops.sampler.pm import PmCountedSampler, PmError, PmSampling, ProfilerWatch
    from gpuflops.sampler.pm_worker import WorkerOpener

    try:
        check_installed()
    except PmError as e:
        if settings.counters == "cupti":
            sampler.close()
            raise SamplerError(f"--counters cupti: {e}") from None
        log.warning("CUPTI PM sampling unavailable (%s): FLOPs use NVML's SM clock, which runs "
                    "ahead of the SMs' real clock under load (docs/accuracy.md)", e)
        return sampler
    pm = PmSampling(sampler.pci_bus_ids(), WorkerOpener(), period_s=settings.pm_period_s)
    pm.start()
    return PmCountedSampler(sampler, pm,
                            watch=ProfilerWatch() if settings.yield_to_profilers else None)


def build(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    registry: CollectorRegistry | None = None,
    record: Path | None = None,
) -> Daemon:
    """Every real object the daemon needs, wired once; ``record``: also write a trace there.

    Raises SamplerError when no sampler can be built (nothing else is opened then). On any later
    failure what was opened is closed again before the error propagates.
    """
    sampler, sampler_stop = build_sampler(settings)
    closers: list[Callable[[], None]] = []
    try:
        return _assemble(settings, sampler, sampler_stop, clock, registry, record, closers)
    except BaseException:
        for fn in reversed(closers):
            try:
                fn()
            except Exception:
                log.exception("error during shutdown")
        sampler.close()
        raise


def _assemble(
    s: Settings,
    sampler: Sampler,
    sampler_stop: threading.Event,
    clock: Callable[[], float],
    registry: CollectorRegistry | None,
    record: Path | None,
    closers: list[Callable[[], None]],
) -> Daemon:
    gpus = sampler.gpus()
    _warn_unmeasurable(gpus)
    per_gpu = dict(s.hmma_precision_per_gpu)
    integrator = Integrator(lambda key: per_gpu.get(key, s.hmma_precision))
    attributor = ProcessAttributor(
        s.attribution_hold_s, analytic=s.analytic_split, analytic_tolerance=s.analytic_split_tolerance
    )
    recorders: list[StepHook] = []
    if record is not None:
        writer = TraceWriter(record, gpus, sampler.interval_s, recording_meta(sampler))
        recorders.append(writer.interval)
        closers.append(writer.close)

    if s.ledger:  # one daemon per state directory, before anything in it is written
        state_lock = StateDirLock(Path(s.state_dir))
        closers.append(state_lock.release)  # runs last
    ledger, rebuilt = _open_ledger(s, clock) if s.ledger else (None, None)
    if ledger is not None:
        closers.append(ledger.close)  # a later failure must not leave it open (closing twice is fine)
    programs_cfg = [load_programs_config(Path(s.program_config) if s.program_config else None)]
    policy = [AccessPolicy(programs_cfg[0])]
    jobs = JobRegistry(
        process_lookup=PsutilProcessLookup(), clock=clock, history=ledger,
        access=lambda program: policy[0](program),
        bound=AnalyticBound(sum(peak_flops_per_s(g) for g in gpus), slack=s.analytic_bound_slack),
    )
    labeler = _labeler(s, jobs, clock)
    totals = Totals(gpus, process_ttl_s=s.process_ttl_s, series_ttl_s=s.series_ttl_s, clock=clock,
                    seed=ledger.totals() if ledger is not None else None)
    sink = LedgerSink(ledger, clock=clock, commit_every_s=s.ledger_commit_s)
    jobs.on_event(sink.on_job_event)
    sink.start()
    shipper = None
    if s.central_url:  # the fleet tier (docs/fleet.md); psycopg is imported only here
        from gpuflops.app.central import start_shipper

        shipper = start_shipper(s, clock)
        # Added before the pipeline's closer, so it runs after it: the last commit ships too.
        closers.append(shipper.stop)

    def analytic_report(event: RegistryEvent) -> None:
        """Analytic work reported by a process: weights for splitting a GPU it shares."""
        if event.kind == "add":
            attributor.record_analytic(event.peer.pid, event.time_s, float(event.data["flops"]))

    jobs.on_event(analytic_report)
    pipeline = Pipeline(gpus, integrator, attributor, labeler, sink, totals, recorders=recorders)
    # Closers run last-added first: the socket stops before the ledger takes its last commit.
    closers.append(pipeline.close)
    def start_session() -> None:
        sink.start_session(
            {"version": __version__, "backend": sampler.name, "host": socket.gethostname(),
             "counters": sampler.describe().get("counter_source", "nvml"),
             "gpu_models": sorted({g.name for g in gpus}),
             **({"rebuilt_derived": rebuilt} if rebuilt else {})},
            [(g.key, g.uuid) for g in gpus],
        )

    evaluator = None
    if ledger is not None:  # off the sampling thread; changed programs only (compliance/programs.py)
        evaluator = ProgramEvaluator(ledger, programs_cfg[0], period_s=s.program_refresh_s,
                                     clock=clock)
        evaluator.start()
        closers.append(evaluator.stop)  # runs before the pipeline's last commit closes the ledger

    def reload_programs(new: Settings) -> None:
        """SIGHUP: the program configuration as its file says now (a bad file raises)."""
        programs_cfg[0] = load_programs_config(Path(new.program_config) if new.program_config else None)
        policy[0] = AccessPolicy(programs_cfg[0])
        if evaluator is not None:
            evaluator.reload(programs_cfg[0])

    server = None
    if s.job_socket:
        server = JobSocketServer(jobs, s.socket_path, mode=s.socket_mode, group=s.socket_group,
                                 limits=ServerLimits(idle_timeout_s=s.socket_idle_s),
                                 durability=sink if ledger is not None else None)
        sink.on_durable(server.wake)
        server.start()
        closers.append(server.stop)
        log.info("job socket listening on %s", s.socket_path)

    registry = registry or CollectorRegistry(auto_describe=False)
    registry.register(FlopsCollector(totals.snapshot, sampler.name))
    registry.register(AttributionCollector(
        lambda: dict(attributor.stats),
        lambda: dict(attributor.timesliced_flops),
        {g.key: g.uuid for g in gpus},
    ))
    registry.register(JobsCollector(totals.snapshot,
                                    lambda: evaluator.view if evaluator else ProgramView(),
                                    jobs.snapshot, sink,
                                    server.stats if server else None))
    if shipper is not None:
        from gpuflops.exporter.central_collector import ShipCollector

        registry.register(ShipCollector(shipper.status, clock))
    return Daemon(
        s, sampler, pipeline, totals, registry,
        stop=threading.Event(), sampler_stop=sampler_stop, clock=clock,
        closers=closers,
        reloaders=[reload_programs], checks=[sink.problem], starters=[start_session],
    )


def _warn_unmeasurable(gpus: list[GpuInfo]) -> None:
    for g in gpus:
        if not g.metrics:
            log.warning(
                "gpu %s (%s): %s. gpuflops exports what NVML offers for it and counts no "
                "FLOPs; gpuflops_gpu_tensor_activity_available is 0.",
                g.key,
                g.name,
                g.unavailable_reason,
            )


def _labeler(s: Settings, jobs: JobRegistry, clock: Callable[[], float]) -> Labeler:
    """pid -> job through the configured sources (the socket's registrations first, by
    default), and the HMMA precision each job declared when it registered."""

    def from_socket(pid: int) -> JobIdentity | None:
        ref = jobs.job_for_pid(pid)
        return None if ref is None else JobIdentity(ref.job_id, ref.program_id, "socket", {})

    kubelet = None
    if s.kubelet_url:
        kubelet = KubeletClient(
            url=s.kubelet_url,
            fetch=urllib_fetch(
                Path(s.kubelet_ca_file) if s.kubelet_ca_file else None,
                verify_tls=not s.kubelet_insecure_tls,
            ),
        )
    pod_resources = None
    if s.pod_resources_socket:
        try:  # grpcio and protobuf come with the kubernetes extra; imported only here
            from gpuflops.identity.podresources import PodResourcesClient, grpc_list
        except ImportError as e:
            raise RuntimeError(f"pod_resources_socket needs grpcio and protobuf ({e}): "
                               "pip install 'gpuflops[kubernetes]'") from None
        pod_resources = PodResourcesClient(grpc_list(s.pod_resources_socket))
    mapper = JobMapper(order=s.job_sources, socket_lookup=from_socket, kubelet=kubelet,
                       pod_resources=pod_resources,
                       authorize=lambda ref, uid, groups: jobs.may_attribute(
                           ref.job, ref.program, uid, groups))

    def resolve(key: tuple[int, str]) -> tuple[str, str]:
        ref = mapper.resolve(*key)
        return ref.job, ref.program

    def declared_precision(job: str) -> str | None:
        snap = jobs.snapshot().job(job)
        return None if snap is None else normalize_precision(snap.metadata.get("precision"))

    declared = Memo(declared_precision, clock)
    job_of = Memo(resolve, clock)
    return Labeler(lambda pid, uuid: job_of((pid, uuid)), lambda job, _program: declared(job))


def _open_ledger(s: Settings, clock: Callable[[], float]) -> tuple[Ledger, str | None]:
    """The ledger, verified, with derived tables rebuilt from the chain where they disagree
    (and why, if they did). Fails closed: a ledger the daemon cannot use stops the start."""
    path = Path(s.state_dir) / LEDGER_FILENAME
    sync: Literal["NORMAL", "FULL"] = "FULL" if s.ledger_sync == "FULL" else "NORMAL"
    advice = ("keep the file: it is evidence. Move it (with its -wal and -shm files) aside to "
              "start a new ledger, or run with --no-ledger to meter without one")
    try:
        ledger = Ledger.open(path, clock=clock, synchronous=sync)
    except (LedgerError, OSError) as e:
        raise LedgerUnusableError(f"ledger {path} cannot be used: {e}; {advice}") from None
    try:
        started = time.monotonic()
        result = ledger.verify_and_rebuild()
    except (LedgerError, OSError, ValueError, KeyError) as e:
        ledger.close()
        raise LedgerUnusableError(f"ledger {path} cannot be verified: {e}; {advice}") from None
    if not result.ok and not result.derived_only:
        ledger.close()
        where = f" at record {result.first_bad_id}" if result.first_bad_id is not None else ""
        raise LedgerUnusableError(f"ledger {path} fails verification{where}: {result.reason}; "
                                  f"{advice}")
    log.info("ledger %s verified: %d records in %.1f s", path, result.records,
             time.monotonic() - started)
    if not result.ok:
        log.error("ledger %s: %s; the derived tables were rebuilt from the hash chain (the "
                  "chain is intact) and the rebuild is recorded in this session's start record",
                  path, result.reason)
        return ledger, result.reason
    return ledger, None


class LedgerUnusableError(RuntimeError):
    """The ledger cannot be opened or fails verification: the daemon does not start on it."""
